"""The registry of verdicts a rule may name.

Verdicts are a closed vocabulary (not free text in the YAML) so that reports can
colour them, JSON consumers can switch on them and a typo in a rule file is a
load-time error. Adding a verdict is one entry here.
"""

from __future__ import annotations

VERDICTS: dict[str, str] = {
    "ok": "the setting satisfies the practitioner rule: nothing to change",
    "needs_higher_rank": "the gradient escapes the update subspace: raise the rank (r >= r_star) or fine-tune the layer fully",
    "add_targets": "apply the adapter to more modules (e.g. the MLPs as well as attention)",
    "needs_finer_precision": "updates do not cross cells of the format: use a finer format, a higher lr, stochastic rounding or fp32 master weights",
    "raise_lr": "the planned learning rate is below half a ULP for most weights: raise it",
    "stochastic_rounding": "round stochastically so sub-ULP updates still cross cells in expectation",
    "fp32_master_weights": "keep fp32 master weights and quantize only the forward copy",
    "prune_less": "the sparsity mask removes directions the gradient needs: prune less",
    "fix_weights": "the checkpoint holds NaN/Inf weights: fix or re-export it",
    "open_field": "fewer than half of the admissible moves lower the realized loss: narrow the hallway",
    "check_range": "weights fall outside the format's range (saturate or flush to zero): rescale or use a wider format",
    "check_generalization": "the hallway helps the training batch but not the held-out batch",
    "does_not_train": "the loss is not expected to drop in this setting: check the learning rate and the data",
    "keep_finer": "a small layer cannot move in this format: keep it in a finer one (advice, not a veto)",
    "lower_lr": "the loss rose over the burst: an early spike, or an lr too high (lower it or add warmup)",
    "drop_target": "the layer gets no gradient under this loss: leave it out of the targets",
}


def verdict_names() -> list[str]:
    return sorted(VERDICTS)
