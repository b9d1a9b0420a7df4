"""The registry of methods, as the API sees it (floor 4): the one registry lives in ``longctx.patches.registry``,
where each method module registers itself; importing this module imports every method."""

from __future__ import annotations

from longctx.patches import registry  # noqa: F401  (imports every method module: they register themselves)
from longctx.patches.registry import Method, get_method, register

MethodSpec = Method  # the name longctx 0.1 used

__all__ = ["Method", "MethodSpec", "registry", "register", "get_method"]
