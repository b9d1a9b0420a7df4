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
    "unpatch": "api", "patched": "api", "load": "api", "methods": "api", "inspect": "api",
    "is_patched": "api", "patch_info": "api", "PatchInfo": "api",
    "export": "export", "ExportResult": "export", "ExportError": "export",
    "v2pe_position_ids": "core.positions",
}
__all__ = sorted([*_PUBLIC, "patch", "search"]) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import PatchInfo, inspect, is_patched, load, methods, patch_info, patched, unpatch
    from .core.positions import v2pe_position_ids
    from .export import ExportError, ExportResult, export


def patch(model: Any, method: str, *, tokenizer: Any = None, **params: Any) -> PatchInfo:
    """Patch ``model`` in place with ``method`` (``longctx.api.patch``: its parameters, errors and guarantees).

    ``method="auto"`` measures every method that applies at ``target_length`` first and applies the best
    (``longctx.eval.recommend.auto_patch``; ``text=``, ``budget_s=`` …); the returned ``PatchInfo.evidence`` holds
    what was measured.
    """
    if method == "auto":
        from .eval.recommend import auto_patch

        return auto_patch(model, tokenizer=tokenizer, **params)
    from .api import patch as patch_one

    return patch_one(model, method, tokenizer=tokenizer, **params)


def search(model: Any, method: str = "longrope", **options: Any) -> Any:
    """Search ``method``'s parameters for ``model`` at ``target_length`` on ``text`` within ``budget_s`` seconds
    (``longctx.eval.search.search``): LongRoPE's factor search seeded with PI, NTK and YaRN for ``"longrope"``, the
    window / size parameters of an attention method (``selfextend``, ``dca``, ``rerope``, ``string``) seeded with its
    defaults; returns a ``SearchResult`` whose ``params`` patch the winner:
    ``longctx.patch(model, method, **result.params)``."""
    from .eval.search import search as run

    return run(model, method, **options)


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
