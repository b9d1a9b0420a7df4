"""Absolute-position encoders (BERT, MiniLM, E5 …): LongEmbed's training-free extensions of a learned position
table, one module per method — ``grouped``, ``recurrent``, ``pcw`` (chunk-and-average), ``pi`` (``pi_absolute``: the
table interpolated) — on the shared pieces of ``common.py``. Every module here is imported (and so registered)."""

from .. import import_methods

import_methods(__name__, __path__, ("grouped", "recurrent", "pcw", "pi"), {"common"})

from .common import interpolate_table  # noqa: E402
from .pcw import pcw_chunks  # noqa: E402

__all__ = ["interpolate_table", "pcw_chunks"]
