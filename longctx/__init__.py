"""longctx: longer context windows for existing Hugging Face checkpoints, without training.

>>> import longctx
>>> info = longctx.patch(model, "yarn", target_length=32768)
>>> longctx.unpatch(model)   # original outputs, bit for bit
"""

from .api import PatchInfo, inspect, is_patched, load, methods, patch, patch_info, unpatch
from .core.positions import v2pe_position_ids
from .export import ExportResult, export

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "load", "export", "methods", "inspect", "is_patched", "patch_info", "PatchInfo",
           "ExportResult", "v2pe_position_ids", "__version__"]
