"""The methods (floor 3, installed as ``longctx.patches``): one module per method — a folder per family — each
declaring and registering itself (``registry.py``), on the shared machinery of ``base.py`` (parameters, reversible
edits as data, the patch record), ``rope_common.py`` (rotary modules) and ``attention.py`` (attention functions,
per-model state, positions per row, the KV cache). Importing this package registers every method."""

# registration order is the listing order of `longctx methods`
from . import pi  # noqa: F401  isort: skip
from . import ntk  # noqa: F401  isort: skip
from . import dynamic_ntk  # noqa: F401  isort: skip
from . import yarn  # noqa: F401  isort: skip
from . import selfextend  # noqa: F401  isort: skip
from . import clex  # noqa: F401  isort: skip
from . import v2pe  # noqa: F401  isort: skip
from . import absolute  # noqa: F401  isort: skip
from .registry import Method, get_method, register, registry

__all__ = ["Method", "get_method", "register", "registry"]
