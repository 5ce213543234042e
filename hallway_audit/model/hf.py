"""Hugging Face directories: the architecture from transformers, the weights checked strictly.

Weights are loaded by transformers' own from_pretrained (local files only,
never remote code), not by our reader: transformers 5 renames and fuses
checkpoint keys on load for some architectures (legacy names, MoE experts), so
only its loader knows which checkpoint key feeds which parameter. Its
permissive habits are switched off: mismatched shapes and missing keys, which
it would silently re-initialise, come back in its loading info and are raised
as one ModelError in the same format as the --model path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from hallway_audit.errors import ModelError, ResourceError, UsageError

from ..checkpoint.base import one_line, shown
from ..limits import is_out_of_memory
from .loaded import LoadedModel, finish
from .size import check_config_size, check_model_size
from .state import mismatch_message

if TYPE_CHECKING:
    from .placement import PlacementSpec

# Any of these beside config.json means the directory ships a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)


def is_hf_model_dir(config: dict[str, Any] | None) -> bool:
    """A config.json transformers can build from: it names an architecture or a model_type."""
    return config is not None and bool(config.get("architectures") or config.get("model_type"))


def _transformers(where: str) -> ModuleType:
    try:
        import transformers
    except ImportError as exc:
        raise UsageError(
            f"{where}: building a Hugging Face model needs transformers: install hallway-audit[hf]"
        ) from exc
    return transformers


@contextlib.contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """No progress bars or load reports on the terminal: problems come back as our errors."""
    hf_logging = transformers.utils.logging
    verbosity = hf_logging.get_verbosity()
    bars_were_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            hf_logging.enable_progress_bar()


def _is_causal_lm(cls_name: str) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # layout changed: fall back to the naming convention
        names: set[str] = set()
    else:
        names = set()
        for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            names.update([value] if isinstance(value, str) else value)
    return cls_name in names or cls_name.endswith(("ForCausalLM", "LMHeadModel"))


def _model_classes(transformers: ModuleType, config: dict[str, Any], where: str) -> list[Any]:
    """Classes to try, in order: the named architecture, else the Auto classes for model_type."""
    arch = (config.get("architectures") or [None])[0]
    if isinstance(arch, str):
        try:
            cls = getattr(transformers, arch)
        except (AttributeError, ImportError, RuntimeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return [cls]
        if config.get("auto_map"):
            raise ModelError(
                f"{where}config.json: architecture {arch!r} is custom code (auto_map), which "
                "hallway-audit never runs; build it yourself and pass --model module:factory"
            )
    # No usable class name: let model_type pick, a causal-LM head first.
    return [transformers.AutoModelForCausalLM, transformers.AutoModel]


def _dtype_kwarg(transformers: ModuleType) -> str:
    """`dtype` since transformers 4.56; `torch_dtype` before (and still accepted, for now)."""
    try:
        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _load(cls: Any, path: Path, hf_config: Any, dtype_kwarg: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    return cls.from_pretrained(
        str(path),
        config=hf_config,
        local_files_only=True,
        trust_remote_code=False,
        **{dtype_kwarg: torch.float32},
        ignore_mismatched_sizes=True,  # report mismatches ourselves instead of a paragraph
        output_loading_info=True,
    )


def _loading_problem(info: dict[str, Any], where: str) -> str | None:
    """What transformers' loading info says does not fit, as one line; None if everything loaded."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    # transformers reports (name, checkpoint shape, model shape)
    mismatched = [(n, tuple(m), tuple(c)) for n, c, m in info.get("mismatched_keys") or ()]
    if missing or unexpected or mismatched:
        return mismatch_message(where, missing, unexpected, mismatched)
    errors = info.get("error_msgs") or []
    if errors:
        return f"model does not load from {where}: {' '.join(str(errors[0]).split())}"
    return None


def _load_first_that_fits(
    transformers: ModuleType, path: Path, hf_config: Any, config: dict[str, Any], where: str
) -> torch.nn.Module:
    """The named class loaded strictly; without one, the first Auto class whose keys all fit.

    Trying AutoModel after AutoModelForCausalLM lets a bare encoder checkpoint
    (no LM head) load as what it is. When nothing fits, a key mismatch is a
    more useful error than "this Auto class has no such head".
    """
    failures: list[tuple[bool, ModelError]] = []  # (is a key mismatch, error)
    for cls in _model_classes(transformers, config, where):
        try:
            module, info = _load(cls, path, hf_config, _dtype_kwarg(transformers))
        except Exception as exc:
            if is_out_of_memory(exc):  # torch's CPU allocator raises a plain RuntimeError
                raise ResourceError(f"{where}: out of memory building the model: {one_line(exc)}") from exc
            error = ModelError(
                f"{where}: transformers cannot build {getattr(cls, '__name__', cls)}: "
                f"{type(exc).__name__}: {one_line(exc)}"
            )
            error.__cause__ = exc
            failures.append((False, error))
            continue
        problem = _loading_problem(info, where)
        if problem is None:
            return module
        failures.append((True, ModelError(problem)))
    raise next((e for mismatch, e in failures if mismatch), failures[0][1])


def _build_empty(transformers: ModuleType, hf_config: Any, config: dict[str, Any], where: str) -> torch.nn.Module:
    """The architecture from_pretrained would build first, without weights (for sizing on meta)."""
    cls: Any = _model_classes(transformers, config, where)[0]
    concrete = isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    module: torch.nn.Module = cls._from_config(hf_config) if concrete else cls.from_config(hf_config)
    return module


def load_tokenizer(path: Path, transformers: ModuleType) -> object | None:
    """The directory's tokenizer, or None when it ships no tokenizer files."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise ModelError(
            f"{shown(path)}: tokenizer files present but transformers cannot load them: "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from exc


def optional_tokenizer(path: Path) -> object | None:
    """The directory's tokenizer for a --model build: None if it has none or transformers is absent."""
    try:
        import transformers
    except ImportError:
        return None
    with _quiet(transformers):
        return load_tokenizer(path, transformers)


def build_hf_model(
    path: Path, config: dict[str, Any], device: str | torch.device, placement: PlacementSpec | None = None,
) -> LoadedModel:
    """The architecture config.json names, its weights from the directory, its tokenizer if any;
    with `placement` (--device-map), spread over devices by accelerate (model/placement.py)."""
    where = shown(path)
    # before transformers parses it: some configs build per-layer lists (a device map needs no one device to hold it)
    check_config_size(config, where, device, memory=placement is None)
    transformers = _transformers(where)
    with _quiet(transformers):
        try:
            hf_config = transformers.AutoConfig.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:
            raise ModelError(
                f"{where}config.json: transformers {transformers.__version__} cannot read it: "
                f"{type(exc).__name__}: {one_line(exc)}"
            ) from exc
        placed = None
        if placement is None:
            check_model_size(lambda: _build_empty(transformers, hf_config, config, where), where, device)
            module = _load_first_that_fits(transformers, path, hf_config, config, where)
        else:
            from .placement import load_placed

            module, placed = load_placed(path, lambda: _build_empty(transformers, hf_config, config, where), placement,
                                         where)
        tokenizer = load_tokenizer(path, transformers)
    model_config: Any = getattr(module, "config", None)
    if getattr(model_config, "use_cache", None):
        # The audit never generates: a KV cache per forward is memory spent for nothing.
        model_config.use_cache = False
    name = type(module).__name__
    kind = "hf-causal-lm" if _is_causal_lm(name) else "hf"
    return finish(
        module,
        kind=kind,
        source=f"transformers {name} from {where}config.json",
        device=device,
        tokenizer=tokenizer,
        placement=placed,
    )

