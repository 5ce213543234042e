"""Hostile calibration data and losses through the real CLI: each case is refused with
its exit code and one line, before any burst, and leaves its inputs unchanged.

Covers user batches (any named tensors with --loss file.py:fn), held-out batches whose
token ids or labels leave the vocabulary (once an IndexError, exit 70), headless models
without a loss, and user losses that fail on some of the data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .harness import assert_refused, assert_unchanged, digest, run_cli

VOCAB = 100

LOSS = '''
import torch
import torch.nn.functional as F


def embed(model, ids, mask):
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def contrastive(model, batch):
    a = embed(model, batch["a_input_ids"], batch["a_attention_mask"])
    b = embed(model, batch["b_input_ids"], batch["b_attention_mask"])
    return F.cross_entropy(a @ b.T / 0.05, torch.arange(a.shape[0]))


def nan(model, batch):
    return contrastive(model, batch) * float("nan")
'''


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=VOCAB)
    path = tmp_path_factory.mktemp("hostile-data") / "bert"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BertModel(config).save_pretrained(path)
    return path


def _pairs(n: int = 12, length: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for side in ("a", "b"):
        out[f"{side}_input_ids"] = torch.randint(1, VOCAB, (n, length), generator=g)
        out[f"{side}_attention_mask"] = torch.ones(n, length, dtype=torch.int64)
    return out


def _ids(n: int = 8, vocab: int = 64) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, 6), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


def _save(tmp: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    save_file(tensors, str(tmp / name))
    return name


def _with(tensors: dict[str, torch.Tensor], key: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in tensors.items()}
    out[key] = edit(out[key])
    return out


def _set(index: tuple[int, int], value: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t

    return edit


# Each case: (model: "bert" | "llama", builder(tmp) -> extra CLI args, exit code, needle).
CASES: dict[str, tuple[str, Callable[[Path], list[str]], int, str]] = {
    "pairs-without-a-loss": (
        "bert", lambda t: ["--calib", _save(t, "p.safetensors", _pairs())], 8, "--loss file.py:fn"),
    "pairs-disagree-on-examples": (
        "bert", lambda t: ["--calib", _save(t, "p.safetensors", _with(_pairs(), "b_input_ids", lambda v: v[:5])),
                           "--loss", "loss.py:contrastive"], 8, "number of examples"),
    "pairs-with-an-empty-dimension": (
        "bert", lambda t: ["--calib", _save(t, "p.safetensors", _with(_pairs(), "a_input_ids", lambda v: v[:, :0])),
                           "--loss", "loss.py:contrastive"], 8, "holds no values"),
    "pairs-outside-the-vocabulary": (
        "bert", lambda t: ["--calib", _save(t, "p.safetensors", _with(_pairs(), "b_input_ids", _set((3, 2), VOCAB + 5))),
                           "--loss", "loss.py:contrastive"], 8, "b_input_ids holds token id 105"),
    "held-out-pairs-outside-the-vocabulary": (
        "bert", lambda t: ["--calib", _save(t, "p.safetensors", _pairs()),
                           "--val", _save(t, "v.safetensors", _with(_pairs(4), "a_input_ids", _set((1, 1), -3))),
                           "--loss", "loss.py:contrastive"], 8, "held-out batch (v.safetensors): a_input_ids"),
    "held-out-pairs-missing-a-key": (
        "bert", lambda t: ["--calib", _save(t, "p.safetensors", _pairs()),
                           "--val", _save(t, "v.safetensors", {k: v for k, v in _pairs(4).items() if k[0] == "a"}),
                           "--loss", "loss.py:contrastive"], 8, "failed on the held-out batch (v.safetensors): KeyError"),
    "loss-is-nan": (
        "bert", lambda t: ["--calib", _save(t, "p.safetensors", _pairs()), "--loss", "loss.py:nan"], 8, "is NaN"),
    "loss-file-missing-before-the-data": (
        "bert", lambda t: ["--calib", "missing.safetensors", "--loss", "nowhere.py:fn"], 2, "no such file"),
    "headless-model-without-a-loss": (
        "bert", lambda t: ["--calib", _save(t, "ids.safetensors", _ids(vocab=VOCAB))], 2, "hidden states"),
    "held-out-ids-outside-the-vocabulary": (
        "llama", lambda t: ["--calib", _save(t, "c.safetensors", _ids()),
                            "--val", _save(t, "v.safetensors", _with(_ids(4), "input_ids", _set((2, 0), 64)))],
        8, "held-out batch (v.safetensors): input_ids holds token id 64"),
    "held-out-labels-outside-the-vocabulary": (
        "llama", lambda t: ["--calib", _save(t, "c.safetensors", _ids()),
                            "--val", _save(t, "v.safetensors", _with(_ids(4), "labels", _set((0, 3), 99)))],
        8, "labels hold 99, outside the model's 64 outputs"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_data_is_refused_in_one_line(case, tmp_path, bert, model_hf_llama):
    which, build, code, needle = CASES[case]
    (tmp_path / "loss.py").write_text(LOSS, encoding="utf-8")
    args = build(tmp_path)
    model = bert if which == "bert" else model_hf_llama[0]
    inputs = [tmp_path, model]
    before = digest(inputs)
    outcome = run_cli([str(model), *args, "--rank", "4", "--steps", "1", "--samples", "4"], cwd=tmp_path)
    assert_refused(outcome, code, needle=needle)
    assert_unchanged(before, inputs)
