"""Checks of the plan against the model, once the model is built: a LoRA rank no
targeted layer can hold is a usage error naming the layer, not a silent clamp."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import UsageError
from ..probe.settings import Setting
from ..probe.targets import parameter_universe, select_targets


def check_ranks_fit(module: nn.Module, settings: Sequence[Setting]) -> None:
    """Every LoRA rank (base or rank_pattern) at most min(in, out) of each layer it targets.

    A rank above min(in, out) adds adapter parameters but no directions (B A has
    rank <= min(in, out)), so the setting would be probed as a smaller rank than
    its label says.
    """
    params = None
    for setting in settings:
        sub = setting.subspace
        if sub.kind != "lora":
            continue
        if params is None:
            params = parameter_universe(module)
        for p in select_targets(params, sub.targets):
            r = sub.rank_for(p.layer)
            out_features, in_features = p.shape
            most = min(out_features, in_features)
            if r > most:
                source = f"rank {r}" if r == sub.rank else f"rank_pattern rank {r}"
                raise UsageError(
                    f"setting {setting.id}: {source} is larger than layer {p.layer} can hold "
                    f"({out_features} x {in_features}: min(in, out) = {most}); use --rank <= {most}, "
                    f"a rank_pattern entry for the layer, or narrower --targets"
                )
