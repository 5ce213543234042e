"""Turn audit figures into rule subjects: one per (scope, setting, layer).

A subject with setting=None carries only setting-independent figures (NaN counts,
zero fraction, spectral), so rules over them fire once per layer, not once per format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeGuard

from .lattice import get_format
from .metrics import METRICS
from .probe import DynamicResult, Setting
from .rules import Subject
from .rules.evaluate import MetricValue
from .scope import FormatScope
from .static import StaticResult
from .static.tally import FormatTally


def _setting_context(fmt: str, lr: float, rounds_stored: int = 1) -> dict[str, MetricValue]:
    f = get_format(fmt)
    return {"format": fmt, "lr": lr, "bits": f.bits, "rounds_stored": rounds_stored, "block_scaled": int(f.scaled)}


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


def static_subjects(static: StaticResult, stored: dict[str, int] | None = None,
                    scope: FormatScope | None = None) -> Iterator[Subject]:
    """`stored`: per format, 1 when the plan steps weights stored in it without master
    weights (rounds_stored(); None: unknown, assumed stepped);
    `scope`: which layers each format applies to (scope.format_scope; None: all)."""
    stored = stored or {}
    for layer in static.layers:
        basics = layer.basics()
        yield Subject("layer", None, layer.name, basics)
        for fmt in static.formats:
            if scope is None or scope(fmt, layer.name):
                yield Subject("layer", fmt, layer.name, {**basics, **layer.format_metrics(fmt), **_setting_context(fmt, static.lr, stored.get(fmt, 1))})
    model_basics = static.model.basics()
    yield Subject("model", None, None, model_basics)
    for fmt in static.formats:
        tally = static.model.formats[fmt] if scope is None else _scoped_model(static, fmt, scope)
        if tally is None:
            continue
        ctx = _setting_context(fmt, static.lr, stored.get(fmt, 1))
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
