"""Turn audit figures into rule subjects: one per (scope, setting, layer).

A subject with setting=None carries only setting-independent figures (NaN counts,
zero fraction, spectral), so rules over them fire once per layer, not once per format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

from .lattice import get_format
from .metrics import METRICS
from .probe import DynamicResult, Setting
from .rules import Subject
from .rules.evaluate import MetricValue
from .scope import FormatScope
from .static import StaticResult
from .static.tally import FormatTally


@dataclass(frozen=True)
class FormatUpdates:
    """How the plan updates the weights stored in each format: whether the static "cannot
    move" estimate (beta_pred) applies, and whether a probe burst measured it instead.

    master_weights, rounding: the plan's (a static-only run's --master-weights and
    --rounding); rounds_stored: per format, 1 when some setting steps its weights without
    master weights under nearest rounding (rounds_stored()); probed: per format, 1 when a
    probe burst ran a setting in it, whose run forecast (beta_run per layer) measures what
    beta_pred estimates from the weights alone. A format absent from rounds_stored is
    assumed stepped, one absent from probed unprobed."""

    master_weights: tuple[str, ...] = ("fp32",)
    rounding: tuple[str, ...] = ("nearest",)
    rounds_stored: dict[str, int] = field(default_factory=dict)
    probed: dict[str, int] = field(default_factory=dict)


def format_updates(formats: Sequence[str], master_weights: Sequence[str], rounding: Sequence[str],
                   probed_settings: Sequence[Setting] | None) -> FormatUpdates:
    """From the probed settings when there are some, else from the planned --master-weights and
    --rounding (the sweep is their cross product: "none" with "nearest" may round every step away)."""
    if probed_settings is None:
        stepped = int("none" in master_weights and "nearest" in rounding)
        return FormatUpdates(tuple(master_weights), tuple(rounding), dict.fromkeys(formats, stepped), dict.fromkeys(formats, 0))
    ran = {s.precision.weights for s in probed_settings}
    return FormatUpdates(tuple(master_weights), tuple(rounding), rounds_stored(probed_settings),
                         {fmt: int(fmt in ran) for fmt in formats})


def _setting_context(fmt: str, lr: float, updates: FormatUpdates) -> dict[str, MetricValue]:
    f = get_format(fmt)
    return {"format": fmt, "lr": lr, "bits": f.bits, "rounds_stored": updates.rounds_stored.get(fmt, 1),
            "probed": updates.probed.get(fmt, 0), "block_scaled": int(f.scaled)}


def rounds_stored(settings: Iterable[Setting]) -> dict[str, int]:
    """Per weight format: 1 when some planned setting updates weights stored in it
    without fp32 master weights under nearest rounding (sub-ULP steps then round away),
    0 when every setting keeps master weights, rounds stochastically (a step of r ULP
    moves the weight with probability r: it moves in expectation) or trains adapters
    over a frozen base. A format absent from the map (a caller that knows nothing of
    the plan) is assumed to be stepped."""
    out: dict[str, int] = {}
    for s in settings:
        stepped = (s.precision.master_weights == "none" and s.precision.rounding == "nearest"
                   and not (s.subspace.kind == "lora" and s.subspace.base == "frozen"))
        out[s.precision.weights] = max(out.get(s.precision.weights, 0), int(stepped))
    return out


def _is_value(v: object) -> TypeGuard[MetricValue]:
    """Rules compare scalars; nested figures (histograms, psi_star by rank) stay in the report."""
    return v is None or isinstance(v, (int, float, str))


def _scoped_model(static: StaticResult, fmt: str, scope: FormatScope) -> FormatTally | None:
    """The model's figures of `fmt` over the layers it applies to (None: none)."""
    total, any_layer = FormatTally(), False
    for layer in static.layers:
        if fmt in layer.tally.formats and scope(fmt, layer.name):
            total += layer.tally.formats[fmt]
            any_layer = True
    return total if any_layer else None


def static_subjects(static: StaticResult, updates: FormatUpdates | None = None,
                    scope: FormatScope | None = None) -> Iterator[Subject]:
    """`updates`: how the plan updates each format's weights (None: unknown, every format
    assumed stepped and unprobed); `scope`: which layers each format applies to
    (scope.format_scope; None: all)."""
    updates = updates or FormatUpdates()
    for layer in static.layers:
        basics = layer.basics()
        yield Subject("layer", None, layer.name, basics)
        for fmt in static.formats:
            if scope is None or scope(fmt, layer.name):
                yield Subject("layer", fmt, layer.name, {**basics, **layer.format_metrics(fmt), **_setting_context(fmt, static.lr, updates)})
    model_basics = static.model.basics()
    yield Subject("model", None, None, model_basics)
    for fmt in static.formats:
        tally = static.model.formats[fmt] if scope is None else _scoped_model(static, fmt, scope)
        if tally is None:
            continue
        ctx = _setting_context(fmt, static.lr, updates)
        model_fmt = {**model_basics, **tally.summary(), **ctx}
        yield Subject("model", fmt, None, model_fmt)
        yield Subject("setting", fmt, None, model_fmt)


def dynamic_subjects(dynamic: DynamicResult) -> Iterator[Subject]:
    """One subject per (setting, layer), per setting for the model, and the setting itself."""
    for result in dynamic.settings:
        s = result.setting
        ctx: dict[str, MetricValue] = {"format": s.precision.weights, "lr": s.optimizer.lr, "bits": s.bits, "rank": s.rank,
                                       "lora": int(s.subspace.kind == "lora")}
        for layer, metrics in result.layer_metrics().items():
            values = {k: v for k, v in metrics.items() if k in METRICS and _is_value(v)}
            planned = result.layers[layer].planned_rank
            yield Subject("layer", result.id, layer, {**values, **ctx, "rank": planned if planned is not None else s.rank})
        model = {k: v for k, v in result.model_metrics().items() if k in METRICS and _is_value(v)}
        yield Subject("model", result.id, None, {**model, **ctx})
        yield Subject("setting", result.id, None, {**model, **ctx})
