"""What the static audit found: per-layer tallies and the whole-model sum."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tally import Tally


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class LayerResult:
    """One module path (the tensor name without .weight/.bias) and its tensors."""

    name: str
    tensors: list[TensorEntry] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    spectral: dict[str, float | None] | None = None
    _spectral_numel: int = 0  # spectral figures come from the layer's largest matrix

    def basics(self) -> dict[str, float | int | None]:
        out = self.tally.basics()
        if self.spectral is not None:
            out.update(self.spectral)
        return out

    def format_metrics(self, fmt: str) -> dict[str, float | None]:
        return self.tally.formats[fmt].summary()


@dataclass
class StaticResult:
    formats: list[str]
    lr: float
    layers: list[LayerResult]
    model: Tally
    skipped: list[tuple[str, str]]  # (tensor name, why it was not audited)
    spectral: bool
    bytes_read: int
    seconds: float

    def layer(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)
