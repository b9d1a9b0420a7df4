"""ReRoPE and Leaky ReRoPE (Su 2023, "Rectified Rotary Position Embeddings"; official code ``bojone/rerope``) as an
attention runtime — no forward replaced, transformers' standard KV cache.

Relative positions are capped at the window w: pairs with i − j < w keep (i, j); farther pairs use the query at w
and the key at 0. Leaky ReRoPE (``leaky_factor`` k): farther pairs grow by 1/k instead, the query at
``(i + w(k − 1))/k`` and the key at ``j/k`` (``longctx.core.pairmaps.ReRoPEMap``). ``log_scale`` multiplies the queries
by ``max(1, ln(i + 1)/ln L)`` on the absolute position, as the official patches do in prefill and decode.

Semantics as coded (tested against the official patches' outputs, ``../shared/fixtures/rerope_official``); the
official decode keeps unrotated keys in a custom cache, longctx keeps the standard one (rotated keys) and rotates the
far keys once, kept on the cache layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from longctx.core.pairmaps import ReRoPEMap, rerope_log_scale

from .base import Applied, Undo, param
from .pairmap import PairMapConfig, PairMapRuntime, decoder, install_pairmap
from .registry import Method, register
from .space import SearchSpace, Tunable, rope_trained_length

NAME = "rerope"
DESCRIPTION = ("ReRoPE: relative positions capped at the window w (leaky_factor k: beyond w they grow by 1/k), "
               "queries scaled by max(1, ln(i+1)/ln L); an attention function, exact, O(n) memory.")


@dataclass(frozen=True)
class ReRoPEConfig(PairMapConfig):
    """ReRoPE. ``window`` w (default L/8: 512 for a 4096 model, the official value); ``leaky_factor`` k (Leaky
    ReRoPE; the official value is 16; None: ReRoPE); ``log_scale``: queries × max(1, ln(i+1)/ln L) (the official
    scaling, on by default); ``target_length``: the length you want (recorded, raises ``max_position_embeddings``:
    ReRoPE has no hard reach)."""

    method: ClassVar[str] = NAME
    window: int | None = param(kind=int, ge=1, doc="w: relative positions are capped here (default 1/8 of L)")
    leaky_factor: float | None = param(kind=float, gt=1, doc="k: Leaky ReRoPE, beyond w positions grow by 1/k")
    log_scale: bool = param(True, kind=bool, optional=False, doc="queries x max(1, ln(i+1)/ln L)")


class ReRoPERuntime(PairMapRuntime):
    """ReRoPE / Leaky ReRoPE on the extended layers."""

    def __init__(self, pmap: ReRoPEMap, log_scale: bool, trained_length: int, rotary: nn.Module,
                 layer_types: list) -> None:
        self.pmap, self.log_scale, self.trained_length = pmap, log_scale, trained_length
        super().__init__(rotary, layer_types)

    def query_scale(self, q_pos: torch.Tensor, n: torch.Tensor) -> torch.Tensor | None:
        return rerope_log_scale(q_pos, self.trained_length) if self.log_scale else None


def apply(model: nn.Module, cfg: ReRoPEConfig, undo: Undo) -> Applied:
    found = decoder(model, cfg)
    L = found.trained_length
    window = int(cfg.window) if cfg.window is not None else max(1, L // 8)
    if window >= L:
        raise ValueError(f"rerope: window={window} must be smaller than the trained length {L}")
    runtime = ReRoPERuntime(ReRoPEMap(window, cfg.leaky_factor), cfg.log_scale, L, found.rotary, found.layer_types)
    params = {"window": window, "log_scale": cfg.log_scale}
    if cfg.leaky_factor is not None:
        params["leaky_factor"] = cfg.leaky_factor
    kind = f"Leaky ReRoPE (k = {cfg.leaky_factor:g})" if cfg.leaky_factor else "ReRoPE"
    note = f"{kind}: relative positions capped at {window}" + (
        f"; queries x max(1, ln(i+1)/ln {L})" if cfg.log_scale else "")
    return install_pairmap(model, runtime, undo, cfg, found, params, note)


def tune(model: nn.Module, target_length: int) -> SearchSpace:
    """The window w in [L/64, L/2], Leaky ReRoPE's k (none, 4, 16), the log scaling of the queries."""
    L = rope_trained_length(model, NAME)
    return SearchSpace(
        {"window": Tunable(max(1, L // 64), max(1, L // 2), int, log=True),
         "leaky_factor": Tunable(choices=(None, 4.0, 16.0)), "log_scale": Tunable(choices=(True, False))},
        {"default": {}}, {"target_length": int(target_length)},
        note=f"window in [{max(1, L // 64)}, {max(1, L // 2)}], leaky factor, log-scaled queries or not")


METHOD = register(Method(
    NAME, "rope_attention", DESCRIPTION, ReRoPEConfig, apply, export_form="longctx", decoders_only=True,
    bounded=False, tune=tune,
    examples=lambda L: [{"target_length": 4 * L}, {"leaky_factor": 4.0, "window": L // 4},
                        {"log_scale": False, "window": L // 8}],
))
