"""The files a run reads, so that no output of the run can overwrite one of them.

Collected from names only (nothing is parsed but a sharded index's weight map),
before any expensive work. A checkpoint directory counts as a whole: every
regular file under it, and the directory itself (see outputs.check_outputs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ONNX_GRAPH_MAX = 64 << 20
MAX_DIR_FILES = 100_000  # a checkpoint directory larger than this is still guarded as a directory


@dataclass(frozen=True)
class RunInput:
    path: str
    what: str  # how an error names it: "the checkpoint", "a rule file (--rules)", ...
    directory: bool = False  # a checkpoint directory: nothing may be written inside it


def _code_file(spec: object) -> str | None:
    """The file of a `path/to/file.py:attr` spec (module specs name no file; a callable
    passed through the Python API is no file either)."""
    if not isinstance(spec, str) or not spec:
        return None
    target, sep, _attr = spec.rpartition(":")
    return target if sep and (target.endswith(".py") or os.path.isfile(target)) else None


def _index_shards(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        names = set(data["weight_map"].values())
    except Exception:  # unreadable indexes are the checkpoint reader's to report
        return []
    return [index.parent / name for name in sorted(names) if isinstance(name, str)]


def _onnx_external(model: Path) -> list[Path]:
    """External data files named by the graph. A graph file over ONNX_GRAPH_MAX holds its
    data inline (external data keeps graphs small), so it is not parsed twice."""
    try:
        if model.stat().st_size > ONNX_GRAPH_MAX:
            return []
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        graph = onnx.load(str(model), load_external_data=False)
        names = {ExternalDataInfo(t).location for t in graph.graph.initializer if uses_external_data(t)}
    except Exception:  # an unreadable model is the checkpoint reader's to report
        return []
    return [model.parent / name for name in sorted(n for n in names if n)]


def checkpoint_inputs(checkpoint: str | os.PathLike[str]) -> list[RunInput]:
    p = Path(os.fspath(checkpoint))
    if p.is_dir():
        found = [RunInput(str(p), "the checkpoint directory", directory=True)]
        for root, _dirs, files in os.walk(p):  # symlinked directories are not followed
            for name in files:
                found.append(RunInput(os.path.join(root, name), f"a file of the checkpoint directory {p}"))
                if len(found) > MAX_DIR_FILES:
                    return found
        return found
    found = [RunInput(str(p), "the checkpoint")]
    if p.name.endswith(".index.json"):
        found += [RunInput(str(s), f"a shard of the checkpoint {p}") for s in _index_shards(p)]
    if p.suffix == ".onnx":
        found += [RunInput(str(s), f"an external data file of the checkpoint {p}") for s in _onnx_external(p)]
    return found


def run_inputs(
    checkpoint: str | os.PathLike[str] | None,
    *,
    rules: Sequence[str | os.PathLike[str]] = (),
    plan: str | None = None,
    peft_config: str | None = None,
    calib: str | None = None,
    val: str | None = None,
    model: object = None,
    loss: object = None,
    others: Sequence[tuple[str, str]] = (),
) -> list[RunInput]:
    """Every file the run reads. `rules`: rule specs as given (the rule set is loaded to
    find every file it extends; an invalid one raises RuleFileError, exit 4, as the
    audit would); `others`: (path, description) pairs such as a report being re-rendered."""
    found: list[RunInput] = []
    if checkpoint is not None:
        found += checkpoint_inputs(checkpoint)
    if rules:
        from ..rules import load_rules

        files = load_rules([os.fspath(r) for r in rules]).files
        found += [RunInput(f, "a rule file (--rules)") for f in files if os.path.exists(f)]
    named = [
        (plan, "the plan file (--plan)"),
        (peft_config, "the PEFT config (--peft-config)"),
        (calib, "the calibration data (--calib)"),
        (val, "the held-out data (--val)"),
        (_code_file(model), "the model source (--model)"),
        (_code_file(loss), "the loss source (--loss)"),
        *others,
    ]
    found += [RunInput(str(path), what) for path, what in named if path]
    return found
