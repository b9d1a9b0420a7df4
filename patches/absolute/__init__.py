"""Absolute-position encoders (BERT, MiniLM, E5 …): LongEmbed's training-free extensions of a learned position
table, one module per method — ``grouped``, ``recurrent``, ``pi`` (``pi_absolute``: the table interpolated),
``pcw`` (chunk-and-average) — on the shared pieces of ``common.py``."""

from . import grouped, recurrent  # isort: skip
from . import pcw, pi  # isort: skip
from .common import interpolate_table
from .pcw import pcw_chunks

__all__ = ["grouped", "recurrent", "pi", "pcw", "interpolate_table", "pcw_chunks"]
