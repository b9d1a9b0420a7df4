"""The methods (floor 3, installed as ``longctx.patches``): one module per method — a folder per family — each
declaring and registering itself (``registry.py``), on the shared machinery of ``base.py`` (parameters, reversible
edits as data, the patch record), ``rope_common.py`` (rotary modules) and ``attention.py`` (attention functions,
per-model state, positions per row, the KV cache).

Importing this package imports every method module it finds here (and every family folder), so a new method is
one new module: nothing else to edit. ``ORDER`` only places the first ones in ``longctx methods``' listing; the
others follow in name order.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from .registry import Method, get_method, register, registry

__all__ = ["Method", "get_method", "register", "registry", "import_methods"]

ORDER = ("pi", "ntk", "dynamic_ntk", "yarn", "longrope", "selfextend", "dca", "rerope", "string", "clex", "v2pe", "absolute")
MACHINERY = {"base", "registry", "rope_common", "attention", "pairmap"}


def import_methods(package: str, path: Iterable[str], order: tuple[str, ...], skip: set[str]) -> None:
    """Import the modules of ``package`` (each registers its method), ``order`` first, the rest by name."""
    names = [m.name for m in pkgutil.iter_modules(path) if m.name not in skip and not m.name.startswith("_")]
    for name in sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n)):
        importlib.import_module(f"{package}.{name}")


import_methods(__name__, __path__, ORDER, MACHINERY)
