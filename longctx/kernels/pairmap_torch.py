"""Attention under a per-pair position map (``longctx.core.pairmaps``: Dual Chunk Attention, ReRoPE), in PyTorch:
the CPU path and the reference of the kernels. Exact, O(n) memory (no q × kv map of a whole sequence).

Inputs are plain tensors: ``query [B, Hq, q, D]`` and ``key [B, Hkv, kv, D]`` already rotated by RoPE at their
positions ``q_pos [B, q]`` / ``k_pos [B, kv]`` (rotate-half layout, the first ``2·len(inv_freq)`` dims rotary);
``value [B, Hkv, kv, Dv]``; ``inv_freq`` the model's rotary inverse frequencies (fp32). Each branch's rotation is
applied as a rotation by the position delta (RoPE rotations compose), angles in fp32. Softmax statistics and merges
run in fp32; GQA query heads are folded into rows (K/V never repeated).

* the **interval path** (causal, no padding, positions ``slot + offset`` shared by every row — prefill, chunked
  prefill and decoding of a batch without padding): per query block (cut at the map's breaks), each branch attends
  over its key interval as one unmasked call over the keys every row of the block uses it for, plus masked calls over
  the edges where the rows differ; the calls are merged exactly through their log-sum-exps. Work ≈ causal attention;
* the **blocked path** (anything else: padding, per-row positions): one ``block × kv`` fp32 score map per branch,
  the branch picked per pair, one softmax;
* :func:`pairmap_attention_naive` rotates raw (un-rotated) q and k to every branch's absolute positions: the test
  oracle.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from longctx.core.pairmaps import PairMap
from longctx.core.rope import apply_rotation, rotate_by_angles

from .lse import attend, masked_softmax, merge

__all__ = ["pairmap_attention", "pairmap_attention_blocked", "pairmap_attention_intervals", "pairmap_attention_naive",
           "rotate_delta", "variant_keys", "uniform_offset"]

def rotate_delta(x: torch.Tensor, pos_from: torch.Tensor, pos_to: torch.Tensor, inv_freq: torch.Tensor
                 ) -> torch.Tensor:
    """``x`` (rotated at ``pos_from``, ``[B, q]``) rotated to ``pos_to`` (float64 or integer ``[B, q]``): a rotation by
    the delta, angles in fp32 (positions subtracted in fp64 first). Returns ``x.dtype``."""
    delta = (pos_to.double() - pos_from.double()).float()
    if not bool(delta.any()):
        return x
    freq = inv_freq.to(device=x.device, dtype=torch.float32)
    return rotate_by_angles(x, delta[:, None, :, None] * freq)


def variant_keys(key: torch.Tensor, k_pos: torch.Tensor, inv_freq: torch.Tensor, pmap: PairMap, variant: int
                 ) -> torch.Tensor:
    """Keys (rotated at ``k_pos``) rotated to the map's key positions of ``variant``."""
    if pmap.key_identity(variant):
        return key
    return rotate_delta(key, k_pos, pmap.key_positions(variant, k_pos.long()), inv_freq)


def uniform_offset(q_pos: torch.Tensor, k_pos: torch.Tensor, key_valid: torch.Tensor | None) -> int | None:
    """The offset ``o`` when every key's position is ``slot + o`` in every row and the queries are the last slots
    (no padding, one offset for the batch); else None."""
    if key_valid is not None and not bool(key_valid.all()):
        return None
    kv_len, q_len = k_pos.shape[1], q_pos.shape[1]
    offset = k_pos - torch.arange(kv_len, device=k_pos.device)
    first = int(offset[0, 0])
    if not bool((offset == first).all()) or not torch.equal(q_pos, k_pos[:, kv_len - q_len:].expand_as(q_pos)):
        return None
    return first


def pairmap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    inv_freq: torch.Tensor,
    pmap: PairMap,
    scaling: float,
    *,
    key_valid: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    keys: dict[int, torch.Tensor] | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Causal attention of ``query`` over ``key`` / ``value`` under ``pmap``, ``[B, Hq, q, Dv]`` in ``query.dtype``.

    ``q_scale [B, q]`` multiplies the queries (a log-length scale, an mscale); ``keys`` optionally supplies the keys
    of a variant already rotated to its positions (kept across decoding steps by the integration; they may carry a
    per-key multiplier). ``key_valid [B, kv]`` masks padding; a query that sees no key returns zeros."""
    keys = dict(keys or {})
    for variant in sorted(set(pmap.variants)):
        if variant not in keys:
            keys[variant] = variant_keys(key, k_pos, inv_freq, pmap, variant)
    if q_scale is not None:
        query = query * q_scale[:, None, :, None].to(query.dtype)
    offset = uniform_offset(q_pos, k_pos, key_valid)
    if offset is not None and value.shape[-1] == query.shape[-1]:
        return pairmap_attention_intervals(query, value, q_pos, inv_freq, pmap, scaling, keys, offset,
                                           block_size=block_size)
    return pairmap_attention_blocked(query, value, q_pos, k_pos, inv_freq, pmap, scaling, keys,
                                     key_valid=key_valid, block_size=block_size)


@dataclass
class _Call:
    """One attention call of a query block: branch ``b`` over keys ``[ks, ke)``, with its additive mask (None:
    every row sees every key) and the rows that see none of them (None: no such row)."""

    b: int
    ks: int
    ke: int
    mask: torch.Tensor | None
    empty: torch.Tensor | None


@dataclass
class _Block:
    qs: int
    qe: int
    tables: dict[int, tuple[torch.Tensor, torch.Tensor] | None]  # branch -> cos / sin of the query's delta
    calls: list[_Call]


class _Plans:
    """The interval path's plan (query blocks, their calls, masks and query rotation tables) depends only on the
    positions, the map and the frequencies: every layer of one forward (and of one decoding step) uses the same, so
    it is built once per forward, not once per layer."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self.entries: dict = {}

    def get(self, pmap: PairMap, offset: int, q_len: int, kv_len: int, rep: int, block: int,
            inv_freq: torch.Tensor, dtype: torch.dtype, device: torch.device) -> list[_Block]:
        # The frequencies are known by identity (a weak reference checked on every hit) and version: an address
        # alone is reused once a model is freed, and would hand one model's plan to another's frequencies.
        key = (pmap, offset, q_len, kv_len, rep, block, id(inv_freq), inv_freq._version, dtype, device)
        entry = self.entries.pop(key, None)
        if entry is None or entry[0]() is not inv_freq:
            entry = (weakref.ref(inv_freq), _plan(pmap, offset, q_len, kv_len, rep, block, inv_freq, dtype, device))
            if len(self.entries) >= self.capacity:
                self.entries.pop(next(iter(self.entries)))
        self.entries[key] = entry  # most recently used last
        return entry[1]


_PLANS = _Plans()


def _plan(pmap: PairMap, offset: int, q_len: int, kv_len: int, rep: int, block: int, inv_freq: torch.Tensor,
          dtype: torch.dtype, device: torch.device) -> list[_Block]:
    first_pos = kv_len - q_len + offset  # position of the first query
    cuts = sorted({first_pos, first_pos + q_len, *range(first_pos, first_pos + q_len, block),
                   *pmap.breaks(first_pos, first_pos + q_len)})
    freq = inv_freq.to(device=device, dtype=torch.float32)
    blocks = []
    for start, end in zip(cuts[:-1], cuts[1:]):
        i = torch.arange(start, end)
        tables: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        calls = []
        for b in range(len(pmap.branches)):
            lo, hi = pmap.intervals(b, i)
            lo = (lo - offset).clamp(0, kv_len).tolist()
            hi = (hi - offset).clamp(0, kv_len).tolist()
            if all(h <= lw for lw, h in zip(lo, hi)):
                continue
            delta = (pmap.query_positions(b, i) - i.double()).float().to(device)
            tables[b] = None if not bool(delta.any()) else (
                torch.cos(delta[:, None] * freq)[None, None], torch.sin(delta[:, None] * freq)[None, None])
            core_lo, core_hi = max(lo), min(hi)
            ranges = [(core_lo, core_hi, False), (min(lo), core_lo, True), (core_hi, max(hi), True)] \
                if core_hi > core_lo else [(min(lo), max(hi), True)]
            lo_t, hi_t = torch.tensor(lo, device=device), torch.tensor(hi, device=device)
            for ks, ke, masked in ranges:
                if ke <= ks:
                    continue
                mask = empty = None
                if masked:
                    j = torch.arange(ks, ke, device=device)[None]
                    allowed = (j >= lo_t[:, None]) & (j < hi_t[:, None])  # [bq, keys]
                    rows_empty = ~allowed.any(-1)
                    empty = rows_empty.repeat(rep) if bool(rows_empty.any()) else None
                    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
                    mask = mask.repeat(rep, 1)[None, None]
                calls.append(_Call(b, ks, ke, mask, empty))
        blocks.append(_Block(start - first_pos, end - first_pos, tables, calls))
    return blocks


def pairmap_attention_intervals(
    query: torch.Tensor, value: torch.Tensor, q_pos: torch.Tensor, inv_freq: torch.Tensor, pmap: PairMap,
    scaling: float, keys: dict[int, torch.Tensor], offset: int, *, block_size: int | None = None,
) -> torch.Tensor:
    """The interval path (see the module docstring): positions are ``slot + offset`` in every row."""
    batch, hq, q_len, dim = query.shape
    hkv, kv_len = value.shape[1], value.shape[2]
    rep = hq // hkv
    plan = _PLANS.get(pmap, offset, q_len, kv_len, rep, block_size or 512, inv_freq, query.dtype, query.device)
    out = torch.empty_like(query)
    for blk in plan:
        qs, qe = blk.qs, blk.qe
        q_block = query[:, :, qs:qe]
        rotated = {b: (q_block if t is None else apply_rotation(q_block, *t)).reshape(batch, hkv, rep * (qe - qs), dim)
                   for b, t in blk.tables.items()}
        parts = []
        for call in blk.calls:
            k_b = keys[pmap.variants[call.b]]
            o, lse = attend(rotated[call.b], k_b[:, :, call.ks:call.ke], value[:, :, call.ks:call.ke], call.mask,
                             scaling)
            if call.empty is not None:  # rows without a key here carry no weight
                lse = lse.masked_fill(call.empty, float("-inf"))
                o = o.nan_to_num(0.0)
            parts.append((o, lse))
        out[:, :, qs:qe] = merge(parts).view(batch, hkv, rep, qe - qs, dim).reshape(batch, hq, qe - qs, dim).to(out.dtype)
    return out


def pairmap_attention_blocked(
    query: torch.Tensor, value: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, inv_freq: torch.Tensor,
    pmap: PairMap, scaling: float, keys: dict[int, torch.Tensor], *, key_valid: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """The blocked path (any padding, per-row positions): per query block one fp32 score map per branch over every
    key up to the block's last slot, the branch picked per pair, causal by position and padding masked."""
    batch, hq, q_len, _ = query.shape
    hkv, kv_len = value.shape[1], value.shape[2]
    rep = hq // hkv
    qp, kp = q_pos.long(), k_pos.long()
    n_branches = len(pmap.branches)
    if block_size is None:  # ~32M fp32 scores per block over all branches
        block_size = max(16, min(q_len, (1 << 25) // max(1, batch * hq * kv_len * n_branches)))
    offset = kv_len - q_len
    vf = value.float()
    out = torch.empty(batch, hkv, rep, q_len, value.shape[-1], dtype=torch.float32, device=query.device)
    for qs in range(0, q_len, block_size):
        qe = min(q_len, qs + block_size)
        bq, ke = qe - qs, min(kv_len, offset + qe)
        i, j = qp[:, qs:qe, None], kp[:, None, :ke]  # [B, bq, 1], [B, 1, ke]
        which = pmap.branch(i, j)[:, None, None]  # [B, 1, 1, bq, ke]
        scores = torch.full((batch, hkv, rep, bq, ke), float("-inf"), device=query.device)
        for b in range(n_branches):
            q_b = rotate_delta(query[:, :, qs:qe], q_pos[:, qs:qe], pmap.query_positions(b, qp[:, qs:qe]), inv_freq)
            s = q_b.float().reshape(batch, hkv, rep * bq, -1) @ keys[pmap.variants[b]][:, :, :ke].float().transpose(
                -1, -2)
            scores = torch.where(which == b, s.view(batch, hkv, rep, bq, ke), scores)
        allowed = j <= i  # causal by position
        slot = torch.arange(ke, device=query.device)[None, None]
        allowed = allowed & (slot <= torch.arange(offset + qs, offset + qe, device=query.device)[None, :, None])
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :ke]
        probs = masked_softmax(scores * scaling, allowed[:, None, None])
        out[:, :, :, qs:qe] = (probs.view(batch, hkv, rep * bq, ke) @ vf[:, :, :ke]).view(batch, hkv, rep, bq, -1)
    return out.reshape(batch, hq, q_len, -1).to(query.dtype)


def pairmap_attention_naive(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
    inv_freq: torch.Tensor, pmap: PairMap, scaling: float, *, key_valid: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: q and k un-rotated, then rotated to each branch's absolute positions; full fp32 score maps, K/V
    repeated per head. Small inputs only."""
    batch, hq, q_len, _ = query.shape
    rep = hq // key.shape[1]
    freq = inv_freq.float().to(query.device)

    def at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return rotate_by_angles(x.float(), pos.float()[:, None, :, None] * freq)

    q_raw, k_raw = at(query, -q_pos.double()), at(key, -k_pos.double())
    if q_scale is not None:
        q_raw = q_raw * q_scale[:, None, :, None].float()
    qp, kp = q_pos.long(), k_pos.long()
    which = pmap.branch(qp[:, :, None], kp[:, None, :])[:, None]
    scores = torch.full((batch, hq, q_len, key.shape[2]), float("-inf"), device=query.device)
    for b in range(len(pmap.branches)):
        q_b = at(q_raw, pmap.query_positions(b, qp))
        k_b = at(k_raw, pmap.key_positions(pmap.variants[b], kp)).repeat_interleave(rep, dim=1)
        scores = torch.where(which == b, q_b @ k_b.transpose(-1, -2), scores)
    allowed = kp[:, None, :] <= qp[:, :, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    scores = (scores * scaling).masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ value.float().repeat_interleave(rep, dim=1)).to(query.dtype)
