"""Per-pair position maps (floor 1: pure math, no transformers): methods that give each (query i, key j) pair a
position pair chosen by where the pair falls, so that no relative distance exceeds what the model was trained on.

A map has *branches*. The pair (i, j) (causal: j ≤ i) uses exactly one branch b, which rotates the query at
``query_positions(b, i)`` and the key at ``key_positions(variant(b), j)``; for each query the keys of one branch form
one interval ``[lo, hi)`` (``intervals``), which is what lets attention run as a few unmasked calls per query block
merged by log-sum-exp. ``breaks`` are the query positions where the intervals jump (query blocks are cut there).

* :class:`DCAMap` — Dual Chunk Attention (An et al., ICML 2024; ChunkLlama's ``chunkllama_attn_replace.py``):
  chunk size s, local window w, chunk length c = s − w, chunks ``[k·c, (k+1)·c)``; keys at ``j mod c``; a query at
  ``i mod c`` for keys of its own chunk (intra), at ``min(i mod c + c, s)`` for the previous chunk (successive), at
  ``min(2c − 1, s)`` for older chunks (inter).
* :class:`ReRoPEMap` — ReRoPE (Su 2023, ``bojone/rerope``): relative positions capped at the window w — pairs with
  i − j < w keep (i, j); farther pairs use the query at w and the key at 0 (relative w). Leaky ReRoPE (``leaky=k``):
  farther pairs use the query at ``(i + w(k − 1)) / k`` and the key at ``j / k`` (relative ``w + (i − j − w)/k``).

* :class:`STRINGMap` — STRING (An et al., ICLR 2025, ``HKUNLP/STRING``): pairs with i − j < S (the shifted offset)
  keep (i, j); farther pairs put the query at i − S + W (W the local window) and keep the key, so their relative
  position d − S + W reuses the well-trained small distances. Each key once (the rule of the official decode; its
  prefill counts the key at d = S in both branches, see ``docs/methods/string.md``).

Positions are returned as float64 (the leaky map is fractional); angles are formed in fp32 by the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PairMap", "DCAMap", "ReRoPEMap", "STRINGMap", "dca_geometry", "dca_mscale", "rerope_log_scale",
           "string_geometry", "STRING_ATTENTION_FACTOR"]

STRING_ATTENTION_FACTOR = 0.1 * math.log(2) + 1  # the official code multiplies cos and sin by it at every length


class PairMap:
    """Interface of a per-pair position map (see the module docstring)."""

    branches: tuple[str, ...] = ()
    variants: tuple[int, ...] = ()  # key-position variant of each branch (branches sharing key positions share it)

    def branch(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The branch index of each pair (broadcast ``i`` and ``j``; meaningful for j ≤ i)."""
        raise NotImplementedError

    def query_positions(self, b: int, i: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def key_positions(self, variant: int, j: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def intervals(self, b: int, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``: key positions ``lo ≤ j < hi`` use branch ``b`` for query ``i`` (causal: hi ≤ i + 1)."""
        raise NotImplementedError

    def breaks(self, start: int, end: int) -> list[int]:
        """Query positions in ``(start, end)`` where a branch's intervals jump (a query block is cut there)."""
        return []

    def key_identity(self, variant: int) -> bool:
        """Whether the variant keeps keys where they are (``key_positions(v, j) == j``)."""
        return False

    def relative(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The effective relative position of each pair (float64): query position minus key position of its branch."""
        b = self.branch(i, j)
        out = torch.zeros(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.float64, device=i.device)
        for k in range(len(self.branches)):
            rel = self.query_positions(k, i) - self.key_positions(self.variants[k], j)
            out = torch.where(b == k, rel.expand_as(out), out)
        return out


def dca_geometry(trained_length: int, chunk_size: int | None = None, local_window: int | None = None
                 ) -> tuple[int, int, int]:
    """``(s, w, c)``: ChunkLlama's defaults s = ¾·L (``L*3//4``), w = L/8 (``L//8``), c = s − w."""
    L = int(trained_length)
    s = int(chunk_size) if chunk_size is not None else L * 3 // 4
    w = int(local_window) if local_window is not None else L // 8
    if w < 1 or s <= w:
        raise ValueError(f"dca: needs 1 <= local_window < chunk_size, got chunk_size={s}, local_window={w}")
    if s > L:
        raise ValueError(f"dca: chunk_size={s} is longer than the trained length {L}: positions would exceed it")
    return s, w, s - w


def dca_mscale(n: torch.Tensor | int, trained_length: int) -> torch.Tensor:
    """ChunkLlama's ``get_mscale``: ``0.05·ln(n / L) + 1`` for n > L, else 1 (it multiplies cos and sin, so the
    logits by its square), fp32."""
    n = torch.as_tensor(n, dtype=torch.float64)
    return torch.where(n > trained_length, 0.05 * torch.log(n / trained_length) + 1, torch.ones_like(n)).float()


def rerope_log_scale(i: torch.Tensor, trained_length: int) -> torch.Tensor:
    """ReRoPE's query scaling ``max(1, ln(i + 1) / ln L)`` on the absolute position i, fp32."""
    return (torch.log(i.double() + 1) / math.log(trained_length)).clamp(min=1).float()


@dataclass(frozen=True)
class DCAMap(PairMap):
    """Dual Chunk Attention's map (see the module docstring): branches intra, successive, inter."""

    chunk_size: int
    local_window: int
    branches: tuple[str, ...] = ("intra", "successive", "inter")
    variants: tuple[int, ...] = (0, 0, 0)

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_window

    def branch(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        c = self.chunk_len
        gap = torch.div(i, c, rounding_mode="floor") - torch.div(j, c, rounding_mode="floor")
        return gap.clamp(min=0, max=2)

    def query_positions(self, b: int, i: torch.Tensor) -> torch.Tensor:
        c, s = self.chunk_len, self.chunk_size
        if b == 0:
            return (i % c).double()
        if b == 1:
            return ((i % c) + c).clamp(max=s).double()
        return torch.full_like(i, min(2 * c - 1, s), dtype=torch.float64)

    def key_positions(self, variant: int, j: torch.Tensor) -> torch.Tensor:
        return (j % self.chunk_len).double()

    def intervals(self, b: int, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.chunk_len
        start = torch.div(i, c, rounding_mode="floor") * c  # the query's chunk starts here
        if b == 0:
            return start, i + 1
        if b == 1:
            return (start - c).clamp(min=0), start
        return torch.zeros_like(i), (start - c).clamp(min=0)

    def breaks(self, start: int, end: int) -> list[int]:
        c = self.chunk_len
        first = (start // c + 1) * c
        return list(range(first, end, c))


@dataclass(frozen=True)
class ReRoPEMap(PairMap):
    """ReRoPE's map (see the module docstring): branches near (i, j) and far; ``leaky``: Leaky ReRoPE's k."""

    window: int
    leaky: float | None = None
    branches: tuple[str, ...] = ("near", "far")
    variants: tuple[int, ...] = (0, 1)

    def branch(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (i - j >= self.window).long()

    def query_positions(self, b: int, i: torch.Tensor) -> torch.Tensor:
        if b == 0:
            return i.double()
        if self.leaky is None:
            return torch.full_like(i, self.window, dtype=torch.float64)
        k = float(self.leaky)
        return (i.double() + self.window * (k - 1)) / k

    def key_positions(self, variant: int, j: torch.Tensor) -> torch.Tensor:
        if variant == 0:
            return j.double()
        if self.leaky is None:
            return torch.zeros_like(j, dtype=torch.float64)
        return j.double() / float(self.leaky)

    def key_identity(self, variant: int) -> bool:
        return variant == 0

    def intervals(self, b: int, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        edge = (i - self.window + 1).clamp(min=0)
        if b == 0:
            return edge, i + 1
        return torch.zeros_like(i), edge


def string_geometry(trained_length: int, shifted_offset: int | None = None, local_window: int | None = None,
                    target_length: int | None = None) -> tuple[int, int]:
    """``(S, W)`` of STRING for a model trained at L: the paper's defaults S = int(0.33·L) (its RULER setting) and
    W = 128 capped at S // 4 for small L; a ``target_length`` N past the reach L + S − W raises S to N − L + W (the
    farthest pair, d = N − 1, then sits at relative position L − 1). Needs 1 <= W < S < L."""
    L = int(trained_length)
    S = int(shifted_offset) if shifted_offset is not None else int(0.33 * L)
    W = int(local_window) if local_window is not None else min(128, max(1, S // 4))
    if shifted_offset is None and target_length is not None:
        S = max(S, int(target_length) - L + W)
    if not 1 <= W < S:
        raise ValueError(f"string: needs 1 <= local_window < shifted_offset, got shifted_offset={S}, local_window={W}")
    if S >= L:
        reach = f" (to reach target_length={target_length}, S = N - L + W = {S})" if target_length else ""
        raise ValueError(f"string: shifted_offset={S} must be smaller than the trained length {L}{reach}: STRING "
                         f"reaches at most L + S - W < 2L - W tokens")
    if target_length is not None and int(target_length) > L + S - W:
        raise ValueError(f"string: shifted_offset={S}, local_window={W} reach {L + S - W} tokens (L + S - W), not "
                         f"target_length={target_length}; raise shifted_offset or leave it to be solved")
    return S, W


@dataclass(frozen=True)
class STRINGMap(PairMap):
    """STRING's map (see the module docstring): branches near (i, j) and shifted (query at i − S + W, key at j)."""

    shifted_offset: int
    local_window: int
    branches: tuple[str, ...] = ("near", "shifted")
    variants: tuple[int, ...] = (0, 0)

    def branch(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (i - j >= self.shifted_offset).long()

    def query_positions(self, b: int, i: torch.Tensor) -> torch.Tensor:
        if b == 0:
            return i.double()
        return i.double() - self.shifted_offset + self.local_window

    def key_positions(self, variant: int, j: torch.Tensor) -> torch.Tensor:
        return j.double()

    def key_identity(self, variant: int) -> bool:
        return True

    def intervals(self, b: int, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        edge = (i - self.shifted_offset + 1).clamp(min=0)
        if b == 0:
            return edge, i + 1
        return torch.zeros_like(i), edge
