"""longctx: longer context windows for existing Hugging Face checkpoints, without training.

>>> import longctx
>>> info = longctx.patch(model, "yarn", target_length=32768)
>>> longctx.unpatch(model)   # original outputs, bit for bit

The public names are imported on first use (``import longctx`` alone loads neither torch nor transformers, so the
command line answers ``--help`` at once).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "patch": "api", "unpatch": "api", "patched": "api", "load": "api", "methods": "api", "inspect": "api",
    "is_patched": "api", "patch_info": "api", "PatchInfo": "api",
    "export": "export", "ExportResult": "export", "ExportError": "export",
    "v2pe_position_ids": "core.positions",
}
__all__ = sorted(_PUBLIC) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import PatchInfo, inspect, is_patched, load, methods, patch, patch_info, patched, unpatch
    from .core.positions import v2pe_position_ids
    from .export import ExportError, ExportResult, export


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'longctx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    if name != "export":  # longctx.export is the export package itself (callable: see longctx/export/__init__.py)
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
