"""The static audit: figures from the weights alone, no data, no architecture
(docs/definitions.md §3)."""

from .audit import run_static
from .result import LayerResult, StaticResult, TensorEntry
from .spectral import spectral_figures
from .tally import FormatTally, Tally

__all__ = ["FormatTally", "LayerResult", "StaticResult", "Tally", "TensorEntry", "run_static", "spectral_figures"]
