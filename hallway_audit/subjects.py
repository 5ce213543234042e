"""Turn audit figures into rule subjects: one per (scope, setting, layer).

A subject with setting=None carries only setting-independent figures (NaN counts,
zero fraction, spectral), so rules over them fire once per layer, not once per format.
"""

from __future__ import annotations

from collections.abc import Iterator

from .lattice import get_format
from .rules import Subject
from .static import StaticResult


def _setting_context(fmt: str, lr: float) -> dict[str, object]:
    return {"format": fmt, "lr": lr, "bits": get_format(fmt).bits}


def static_subjects(static: StaticResult) -> Iterator[Subject]:
    for layer in static.layers:
        basics = layer.basics()
        yield Subject("layer", None, layer.name, basics)
        for fmt in static.formats:
            yield Subject("layer", fmt, layer.name, {**basics, **layer.format_metrics(fmt), **_setting_context(fmt, static.lr)})
    model_basics = static.model.basics()
    yield Subject("model", None, None, model_basics)
    for fmt in static.formats:
        ctx = _setting_context(fmt, static.lr)
        model_fmt = {**model_basics, **static.model.formats[fmt].summary(), **ctx}
        yield Subject("model", fmt, None, model_fmt)
        yield Subject("setting", fmt, None, model_fmt)
