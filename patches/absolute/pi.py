"""Position interpolation of a learned absolute table (LongEmbed's PI; ``pi`` on an absolute-position model).

A table of ``s·L`` rows (``s = ceil(N / L)``) linearly interpolated between the learned rows, which stay as anchors
at rows ``k·s`` (``"cubic"``: Catmull-Rom through the anchors); a row of length ``n`` reads rows
``p · max(1, floor(s·L / n))`` — inputs ≤ L hit the anchors, i.e. the original embeddings exactly (the E5-Base-4k
convention), the longest inputs use every interpolated row. The export writes the table into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..base import Applied, Undo, param
from ..registry import Method, register
from .common import AbsoluteConfig, install_positions

NAME = "pi_absolute"
DESCRIPTION = ("position interpolation of a learned absolute table (LongEmbed's PI; 'pi' on an absolute-position "
               "model); learned rows kept as anchors, exact for n <= L")


@dataclass(frozen=True)
class AbsolutePIConfig(AbsoluteConfig):
    """Position interpolation of the learned table; ``mode``: ``"linear"`` or ``"cubic"`` (``log_scale`` as for
    grouped). ``table_interpolated=True``: the table already holds the ``s·L`` interpolated rows (a saved patched
    model being re-loaded by ``longctx.load``), only the row mapping is installed."""

    method: ClassVar[str] = NAME
    mode: str = param("linear", kind=str, choices=("linear", "cubic"), optional=False, doc="interpolation")
    table_interpolated: bool = param(False, kind=bool, optional=False,
                                     doc="the table already holds the interpolated rows (a saved copy)")


def apply(model: nn.Module, cfg: AbsolutePIConfig, undo: Undo) -> Applied:
    return install_positions(model, cfg, undo, "pi", True, [f"position table interpolated ({cfg.mode})"])


METHOD = register(Method(NAME, "absolute", DESCRIPTION, AbsolutePIConfig, apply, export_form="weights",
                         compare_by_default=True, unchanged_within=True,
                         examples=lambda L: [{"target_length": 4 * L}, {"target_length": 3 * L, "mode": "cubic"}]))
