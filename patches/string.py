"""STRING (An et al., ICLR 2025, "Why Does the Effective Context Length of LLMs Fall Short?"; official code
``HKUNLP/STRING``, ``string_for_llama.py``) as an attention runtime on the pair-map machinery — no forward replaced,
transformers' standard KV cache.

Pairs closer than the shifted offset S keep their positions; farther ones put the query at i − S + W (W the local
window), so a distance d ≥ S is seen at the well-trained d − S + W (``longctx.core.pairmaps.STRINGMap``). The
official code also multiplies cos and sin by ``0.1·ln 2 + 1`` at every length (scores × its square):
``attention_factor`` (1 turns it off).

Semantics as coded (tested against the official outputs, ``../shared/fixtures/string_official``): each key once — the
rule of the official decode, so prefill and cached decoding agree. The official prefill counts the key at distance
exactly S in both branches (an artefact of flash-attn's inclusive window), which its own decode does not: longctx
matches the fixtures' each-key-once tensors (``logits_nodup``), not that duplicate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from longctx.core.pairmaps import STRING_ATTENTION_FACTOR, STRINGMap, string_geometry

from .base import Applied, Undo, param
from .pairmap import PairMapConfig, PairMapRuntime, decoder, install_pairmap
from .registry import Method, register
from .space import SearchSpace, Tunable, rope_trained_length

NAME = "string"
DESCRIPTION = ("STRING: distances >= the shifted offset S are seen at d - S + W, reusing well-trained small "
               "positions (each key once); an attention function, exact, O(n) memory.")


@dataclass(frozen=True)
class STRINGConfig(PairMapConfig):
    """STRING. ``shifted_offset`` S (default int(0.33·L), the paper's RULER setting; a ``target_length`` past the
    reach L + S − W solves S = N − L + W), ``local_window`` W (default 128, capped at S // 4 for small L),
    ``attention_factor`` (cos/sin × it, as the official code: 0.1·ln 2 + 1; 1 for none)."""

    method: ClassVar[str] = NAME
    shifted_offset: int | None = param(kind=int, ge=2, doc="S: distances >= S are shifted (default 0.33 x L)")
    local_window: int | None = param(kind=int, ge=1, doc="W: shifted distances land at d - S + W (default 128, < S)")
    attention_factor: float = param(STRING_ATTENTION_FACTOR, kind=float, gt=0, optional=False,
                                    doc="cos and sin x this factor (scores x its square), as the official code")


class STRINGRuntime(PairMapRuntime):
    """STRING on the extended layers; the attention factor scales the queries by its square."""

    def __init__(self, pmap: STRINGMap, attention_factor: float, rotary: nn.Module, layer_types: list) -> None:
        self.pmap, self.attention_factor = pmap, attention_factor
        super().__init__(rotary, layer_types)

    def query_scale(self, q_pos: torch.Tensor, n: torch.Tensor) -> torch.Tensor | None:
        if self.attention_factor == 1.0:
            return None
        return torch.full(q_pos.shape, self.attention_factor ** 2, dtype=torch.float32, device=q_pos.device)


def apply(model: nn.Module, cfg: STRINGConfig, undo: Undo) -> Applied:
    found = decoder(model, cfg)
    L = found.trained_length
    S, W = string_geometry(L, cfg.shifted_offset, cfg.local_window, cfg.target_length)
    if cfg.target_length is None:  # its reach: the farthest pair at relative position L - 1 (warned past it)
        cfg = dataclasses.replace(cfg, target_length=L + S - W)
    runtime = STRINGRuntime(STRINGMap(S, W), cfg.attention_factor, found.rotary, found.layer_types)
    params = {"shifted_offset": S, "local_window": W, "attention_factor": cfg.attention_factor}
    note = (f"STRING: distances >= {S} seen at d - {S - W} (reach {L + S - W} tokens); cos/sin x "
            f"{cfg.attention_factor:.4g}")
    return install_pairmap(model, runtime, undo, cfg, found, params, note)


def tune(model: nn.Module, target_length: int) -> SearchSpace:
    """S and W with the reach L + S − W >= N (checked by the patch), the attention factor in [1, 1.2]. STRING
    reaches fewer than 2L − 1 tokens: a longer target raises."""
    L = rope_trained_length(model, NAME)
    n = int(target_length)
    low = max(2, n - L + 1)  # S >= N - L + W, W >= 1
    if low > L - 1:
        raise ValueError(f"string reaches at most L + S - W < 2L - 1 = {2 * L - 1} tokens (S < L, W >= 1); "
                         f"target_length={n} is past it")
    return SearchSpace(
        {"shifted_offset": Tunable(low, L - 1, int), "local_window": Tunable(1, max(1, L // 4), int, log=True),
         "attention_factor": Tunable(1.0, 1.2, float)},
        {"default": {}}, {"target_length": n},
        note=f"shifted offset in [{low}, {L - 1}], local window in [1, {max(1, L // 4)}], attention factor in [1, 1.2]")


METHOD = register(Method(
    NAME, "rope_attention", DESCRIPTION, STRINGConfig, apply, export_form="longctx", decoders_only=True, tune=tune,
    examples=lambda L: [{}, {"target_length": L + L // 2}, {"shifted_offset": L // 4, "local_window": L // 8,
                                                               "attention_factor": 1.0}],
))
