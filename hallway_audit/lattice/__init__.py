"""Number formats ("lattices"): ulp, quantize and cell ids for every format the
audit knows, exact against ml_dtypes for the floats. See docs/definitions.md §2.

    fmt = get_format("mxfp4")
    lat = fmt.at(weight)            # scales computed once from `weight`
    lat.ulp(weight), lat.quantize(weight + step), lat.cell_id(weight + step)
"""

from hallway_audit.lattice import catalog as _catalog  # noqa: F401  (fills the registry)
from hallway_audit.lattice.base import NAN_CELL, Format, Lattice
from hallway_audit.lattice.registry import get_format, list_formats, register

__all__ = ["NAN_CELL", "Format", "Lattice", "get_format", "list_formats", "register"]
