"""Attention under a per-pair position map (Dual Chunk Attention, ReRoPE, Leaky ReRoPE) as one Triton kernel:
flash-attention's online softmax over K/V tiles, forward only. The second member of the family that
:mod:`longctx.kernels.selfextend_triton` began; it shares that kernel's machinery (row layout, rotation, tile loads,
products, split-KV merge, launch recording for the offline compile checks).

Same contract as :func:`longctx.kernels.pairmap_torch.pairmap_attention` for the calls it supports (see
:func:`supports` and :func:`~longctx.kernels.selfextend_triton.row_layout`): q arrives rotated at its positions, the
keys of each key variant of the map arrive rotated to that variant's positions (``keys``: computed once and kept on
the KV-cache layer by the integration), positions are ``slot + a per-row offset`` and the valid keys one slot range
per row (left padding), full rotary dim, fp16 / bf16 / fp32.

How the work is laid out:

- **Rows are (query, head) pairs of one KV head** (query-major), as in the SelfExtend kernel: each K/V tile is loaded
  once for the ``rep = Hq / Hkv`` heads that share it, and a decoding step fills a tile with its heads.
- **Branches one after another, one softmax.** The map's branches (DCA: intra-chunk, previous chunk, older chunks;
  ReRoPE: near, far) partition each query's keys into intervals (``PairMap.intervals``), and the intervals grow with
  the query position, so a block of rows visits, per branch, the key tiles between its first row's interval start
  and its last row's interval end. The keys inside every row's interval (from the last row's start to the first
  row's end) run as whole tiles without any predicate — loaded unmasked, no score masked, as plain flash attention
  (the SelfExtend kernel's interior loop); only the band where the rows' intervals differ, and partial tiles, are
  masked to each row's own interval. The online softmax runs on
  across branches (the partition makes that exact), so no merge is needed.
- **Rotations in fp32 from inv_freq**: the query tile is rotated once per branch by the delta between the branch's
  query position and its own (DCA: ``i mod c``, ``min(i mod c + c, s)``, ``min(2c − 1, s)``; ReRoPE: w, or
  ``(i + w(k − 1))/k`` for Leaky ReRoPE), in the input's dtype for the products, as the PyTorch path does.
- **Per-row query scale** (ReRoPE's log-length scale, DCA's mscale) folded into the score scale.
- **Decode splits the KV length** (flash-decoding), merged by the SelfExtend kernel's log-sum-exp merge.
"""

from __future__ import annotations

import torch

from longctx.core.pairmaps import DCAMap, PairMap, ReRoPEMap, STRINGMap

from . import selfextend_triton as _se
from .selfextend_triton import HEAD_DIMS, LOG2E, Unsupported, available, interpreted, row_layout, triton

tl = _se.tl

__all__ = ["available", "supports", "row_layout", "pairmap_attention_triton", "Unsupported", "HEAD_DIMS",
           "map_form"]


def map_form(pmap: PairMap) -> tuple[int, int, int, float, tuple[int, ...]] | None:
    """``(kind, p0, p1, leaky, variants)`` of a map the kernel computes (kind 0: DCA with p0 = c, p1 = s; kind 1:
    ReRoPE with p0 = w, leaky = (k − 1)/k or 0; kind 2: STRING with p0 = S, p1 = W), or None."""
    if isinstance(pmap, DCAMap):
        return 0, pmap.chunk_len, pmap.chunk_size, 0.0, tuple(pmap.variants)
    if isinstance(pmap, ReRoPEMap):
        k = float(pmap.leaky) if pmap.leaky is not None else 0.0
        return 1, pmap.window, 0, (k - 1.0) / k if k else 0.0, tuple(pmap.variants)
    if isinstance(pmap, STRINGMap):
        return 2, pmap.shifted_offset, pmap.local_window, 0.0, tuple(pmap.variants)
    return None


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, inv_freq: torch.Tensor, pmap: PairMap,
             softcap: float | None = None) -> str | None:
    """``None`` when the kernel takes this call, else why not (the caller falls back to the torch path). The position
    and padding layout is checked by :func:`row_layout` (it needs the tensors' values)."""
    if map_form(pmap) is None:
        return f"no Triton form for {type(pmap).__name__}"
    if len(set(pmap.variants)) > 2:
        return "more than two key variants"
    return _se.supports(query, key, value, inv_freq, softcap)


if triton is not None:

    @triton.jit
    def _branch(pos, B: tl.constexpr, KIND: tl.constexpr, p0, p1, leaky, LEAKY: tl.constexpr):
        """``(query delta, lo, hi)`` of branch ``B`` at query positions ``pos`` (a row vector or a scalar): the
        branch's query position minus ``pos`` (fp32), and its keys' positions ``[lo, hi)``."""
        if KIND == 0:  # DCA: p0 = c, p1 = s; keys at j mod c
            start = (pos // p0) * p0
            if B == 0:  # own chunk: the query at i mod c
                delta = -start
                lo = start
                hi = pos + 1
            elif B == 1:  # previous chunk: min(i mod c + c, s)
                delta = tl.minimum(pos - start + p0, p1) - pos
                lo = tl.maximum(start - p0, 0)
                hi = start
            else:  # older chunks: min(2c − 1, s)
                delta = tl.minimum(2 * p0 - 1, p1) - pos
                lo = start * 0
                hi = tl.maximum(start - p0, 0)
        else:  # ReRoPE: p0 = w; near keys where they are, far keys at 0 (leaky: j / k). STRING: p0 = S, p1 = W
            edge = tl.maximum(pos - p0 + 1, 0)
            if B == 0:
                delta = pos * 0
                lo = edge
                hi = pos + 1
            else:
                if KIND == 1:
                    delta = p0 - pos
                else:  # STRING: the query at i − S + W, keys where they are
                    delta = pos * 0 + (p1 - p0)
                lo = edge * 0
                hi = edge
        delta = delta.to(tl.float32)
        if KIND == 1 and B == 1 and LEAKY:  # (i + w(k − 1))/k − i = (w − i)(k − 1)/k
            delta = delta * leaky
        return delta, lo, hi

    @triton.jit
    def _pm_tiles(acc, m_i, l_i, qb1, qb2, k_ptr, skn, v_ptr, svn, lo, hi, pos_off, lo_r, hi_r, live, row_scale,
                  HALF: tl.constexpr, HALF_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
                  BLOCK_N: tl.constexpr, FP32: tl.constexpr, MASKED: tl.constexpr):
        """Online softmax over key tiles ``[lo, hi)`` of one branch. ``MASKED=False`` is the branch's interior: whole
        tiles of keys inside every row's interval, so no predicate is computed and the tiles load unmasked (plain
        flash attention's loop); ``MASKED=True`` takes the band where the rows' intervals differ and partial tiles."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, HALF_P)
        offs_v = tl.arange(0, DV_P)
        hmask = offs_h < HALF
        vmask = offs_v < DV
        for n0 in range(lo, hi, BLOCK_N):
            j = n0 + offs_n
            jm = j < hi
            k1 = _se._load_tile(k_ptr, j, skn, offs_h, jm, hmask, MASKED, HALF != HALF_P)
            k2 = _se._load_tile(k_ptr + HALF, j, skn, offs_h, jm, hmask, MASKED, HALF != HALF_P)
            s = _se._scores(qb1, qb2, k1, k2, FP32)
            if MASKED:
                pj = j + pos_off
                ok = jm[None, :] & (pj[None, :] >= lo_r[:, None]) & (pj[None, :] < hi_r[:, None]) & live[:, None]
                s = tl.where(ok, s, float("-inf"))
            acc, m_i, l_i = _se._softmax_step(acc, m_i, l_i, s, row_scale, v_ptr, j, svn, offs_v, jm, vmask, DV, DV_P,
                                              FP32, MASKED)
        return acc, m_i, l_i

    @triton.jit
    def _pairmap_fwd(
        Q, K0, K1, V, FREQ, QSCALE, POS_OFF, KV_LO, KV_HI, OUT, O_WS, LSE_WS,
        sqb, sqh, sqm, sab, sah, san, scb, sch, scn, svb, svh, svn, sob, soh, som, ssb,
        hkv, q_len, kv_len, chunk, qk_scale, p0, p1, leaky,
        KIND: tl.constexpr, NB: tl.constexpr, VAR1: tl.constexpr, VAR2: tl.constexpr, LEAKY: tl.constexpr,
        REP: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QSCALE: tl.constexpr, SPLIT: tl.constexpr,
        FP32: tl.constexpr,
    ):
        b, kvh, pid_s, pos_off, kv_lo, kv_hi, row_ok, t, head, i_slot = _se._program_rows(
            POS_OFF, KV_LO, KV_HI, hkv, q_len, kv_len, REP, BLOCK_M)
        live = row_ok & (i_slot >= kv_lo)  # real queries (a left-padded row's padding is not)
        pos = tl.maximum(i_slot + pos_off, 0)
        offs_h = tl.arange(0, HALF_P)
        hmask = offs_h < HALF
        qmask = row_ok[:, None] & hmask[None, :]
        q_ptr = Q + b * sqb + head[:, None] * sqh + t[:, None] * sqm + offs_h[None, :]
        q1 = tl.load(q_ptr, mask=qmask, other=0.0)
        q2 = tl.load(q_ptr + HALF, mask=qmask, other=0.0)
        q1f = q1.to(tl.float32)
        q2f = q2.to(tl.float32)
        freq = tl.load(FREQ + offs_h, mask=hmask, other=0.0)
        row_scale = tl.zeros((BLOCK_M,), tl.float32) + qk_scale
        if HAS_QSCALE:
            row_scale = row_scale * tl.load(QSCALE + b * ssb + t, mask=row_ok, other=1.0)

        # the block's first and last real query positions: each branch's key tiles lie between their intervals
        p_hi = tl.max(tl.where(live, pos, -1), 0)
        p_lo = tl.min(tl.where(live, pos, p_hi), 0)
        p_hi = tl.maximum(p_hi, 0)
        p_lo = tl.maximum(p_lo, 0)
        lo_all = tl.maximum(kv_lo, pid_s * chunk)
        hi_all = tl.minimum(kv_hi, pid_s * chunk + chunk)

        acc = tl.zeros((BLOCK_M, DV_P), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        all_live = tl.min(live.to(tl.int32), 0) == 1  # the interior needs every row of the block real
        for B in tl.static_range(NB):
            delta, lo_r, hi_r = _branch(pos, B, KIND, p0, p1, leaky, LEAKY)
            # intervals grow with the query position: the block's keys lie in [lo(first), hi(last)), and the keys
            # every row sees in [lo(last), hi(first))
            _d0, lo_b, hi_in = _branch(p_lo, B, KIND, p0, p1, leaky, LEAKY)
            _d1, lo_in, hi_b = _branch(p_hi, B, KIND, p0, p1, leaky, LEAKY)
            start = tl.maximum(lo_b - pos_off, lo_all)
            end = tl.minimum(hi_b - pos_off, hi_all)
            inner_lo = tl.minimum(tl.maximum(lo_in - pos_off, start), end)
            inner_hi = tl.where(all_live, tl.maximum(tl.minimum(hi_in - pos_off, end), inner_lo), inner_lo)
            inner_hi = inner_lo + ((inner_hi - inner_lo) // BLOCK_N) * BLOCK_N  # whole tiles only
            if KIND >= 1 and B == 0:  # near keys: the query where it is
                qb1 = q1
                qb2 = q2
            else:
                r1, r2 = _se._rotate(q1f, q2f, delta[:, None] * freq[None, :])
                qb1 = r1.to(q1.dtype)
                qb2 = r2.to(q1.dtype)
            if (B == 1 and VAR1) or (B == 2 and VAR2):
                k_ptr = K1 + b * scb + kvh * sch
                skn = scn
            else:
                k_ptr = K0 + b * sab + kvh * sah
                skn = san
            v_ptr = V + b * svb + kvh * svh
            acc, m_i, l_i = _pm_tiles(acc, m_i, l_i, qb1, qb2, k_ptr, skn, v_ptr, svn, start, inner_lo, pos_off,
                                      lo_r, hi_r, live, row_scale, HALF, HALF_P, DV, DV_P, BLOCK_N, FP32, True)
            acc, m_i, l_i = _pm_tiles(acc, m_i, l_i, qb1, qb2, k_ptr, skn, v_ptr, svn, inner_lo, inner_hi, pos_off,
                                      lo_r, hi_r, live, row_scale, HALF, HALF_P, DV, DV_P, BLOCK_N, FP32, False)
            acc, m_i, l_i = _pm_tiles(acc, m_i, l_i, qb1, qb2, k_ptr, skn, v_ptr, svn, inner_hi, end, pos_off,
                                      lo_r, hi_r, live, row_scale, HALF, HALF_P, DV, DV_P, BLOCK_N, FP32, True)

        _se._store_rows(acc, m_i, l_i, OUT, O_WS, LSE_WS, b, head, t, row_ok, pid_s, hkv, q_len, sob, soh, som,
                        REP, DV, DV_P, SPLIT)


# (BLOCK_M, BLOCK_N, warps, stages) per shape class, chosen from what the compiler makes of them for sm_90
# (``tests/kernels/_compile_sm90.py --pairmap``, triton 3.9): each fits, no spills. Spilling there: 64×64 tiles on 4
# warps at head dim 128 (256 bytes per thread), 128-row tiles, 64-row tiles at head dim 256, fp32 32×32 on 8 warps at
# head dim 64 (56 bytes) and on 4 warps at head dim 128. Decode: (BLOCK_N, warps, stages), BLOCK_M fits the rows.
# Not yet timed on a GPU.
_PREFILL = {"": (64, 64, 8, 2), "wide": (32, 32, 8, 2), "fp32-narrow": (32, 32, 4, 2), "fp32": (32, 32, 8, 2),
            "fp32-wide": (16, 32, 8, 2)}
_DECODE = {"": (64, 4, 2), "wide": (32, 4, 2), "fp32-narrow": (32, 8, 2), "fp32": (32, 8, 2),
           "fp32-wide": (16, 8, 2)}


def _shape_class(fp32: bool, dim: int) -> str:
    if fp32:
        return "fp32-wide" if dim > 128 else "fp32" if dim > 64 else "fp32-narrow"
    return "wide" if dim > 128 else ""


def _config(decode: bool, shapes: str) -> dict:
    if interpreted():
        return {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1} | ({} if decode else {"BLOCK_M": 16})
    if decode:
        return dict(zip(("BLOCK_N", "num_warps", "num_stages"), _DECODE[shapes]))
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), _PREFILL[shapes]))


def pairmap_attention_triton(
    query: torch.Tensor,
    value: torch.Tensor,
    pmap: PairMap,
    inv_freq: torch.Tensor,
    scaling: float,
    keys: dict[int, torch.Tensor],
    layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    q_scale: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Causal attention under ``pmap`` with the Triton kernel, ``[B, Hq, q, Dv]`` in ``query.dtype`` (a view of a
    ``[B, q, Hq, Dv]`` buffer).

    ``keys``: the keys of every key variant of the map, each rotated to that variant's positions (for a variant that
    keeps keys where they are, the keys themselves), ``[B, Hkv, kv, D]``. ``layout`` = (position offset, first valid
    key, end of valid keys) per row, from :func:`row_layout`. ``q_scale [B, q]`` multiplies the queries. ``splits``
    sets the number of KV chunks of a decoding step (default: enough programs to fill the GPU). The caller has checked
    :func:`supports`."""
    form = map_form(pmap)
    if form is None:
        raise Unsupported(f"no Triton form for {type(pmap).__name__}")
    kind, p0, p1, leaky, variants = form
    order = sorted(set(variants))
    k0 = keys[order[0]]
    k1 = keys[order[-1]]
    var = [order.index(v) for v in variants] + [0] * (3 - len(variants))
    batch, hq, q_len, dim = query.shape
    hkv, kv_len, dv = k0.shape[1], k0.shape[2], value.shape[-1]
    rep = hq // hkv
    offset, lo, hi = layout
    decode = q_len <= 16
    freq = inv_freq.to(device=query.device, dtype=torch.float32).contiguous()
    rows = rep * q_len
    decode_m = 16 if interpreted() else max(16, min(64, _se._pow2(rows)))
    if splits is None:
        splits = 1
        if decode and not interpreted():
            programs = batch * hkv * _se._cdiv(rows, decode_m)
            splits = max(1, min(_se._cdiv(kv_len, 256), _se._cdiv(4 * _se._sm_count(query.device), programs)))
    chunk = _se._cdiv(_se._cdiv(kv_len, splits), _se.CHUNK_ALIGN) * _se.CHUNK_ALIGN
    splits = _se._cdiv(kv_len, chunk)
    out = torch.empty(batch, q_len, hq, dv, device=query.device, dtype=query.dtype).transpose(1, 2)
    split = splits > 1
    dv_p = _se._pow2(max(16, dv))
    if split:
        o_ws = torch.empty(batch * hq * q_len * splits, dv_p, device=query.device, dtype=torch.float32)
        lse_ws = torch.empty(batch * hq * q_len * splits, device=query.device, dtype=torch.float32)
    else:
        o_ws = lse_ws = out
    scale = freq  # a placeholder pointer when there is no query scale
    if q_scale is not None:
        scale = q_scale.to(device=query.device, dtype=torch.float32).expand(batch, q_len).contiguous()
    fp32 = query.dtype == torch.float32
    config = _config(decode, _shape_class(fp32, dim))
    if decode:
        config["BLOCK_M"] = decode_m
    half = dim // 2
    args = (query, k0, k1, value, freq, scale, offset, lo, hi, out, o_ws, lse_ws,
            *query.stride()[:3], *k0.stride()[:3], *k1.stride()[:3], *value.stride()[:3], *out.stride()[:3],
            scale.stride(0) if q_scale is not None else 0,
            hkv, q_len, kv_len, chunk, scaling * LOG2E, p0, p1, leaky)
    meta = dict(KIND=kind, NB=len(variants), VAR1=bool(var[1]), VAR2=bool(var[2]), LEAKY=bool(leaky), REP=rep,
                HALF=half, HALF_P=_se._pow2(max(16, half)), DV=dv, DV_P=dv_p, HAS_QSCALE=q_scale is not None,
                SPLIT=split, FP32=fp32)
    grid = (_se._cdiv(rows, config["BLOCK_M"]), batch * hkv, splits)
    _se._launch(_pairmap_fwd, grid, args, meta | config)
    if split:
        _se._launch(_se._merge_splits, (batch * hq * q_len,), (o_ws, lse_ws, out, *out.stride()[:3], hq, q_len, splits),
                    dict(S_P=_se._pow2(max(2, splits)), DV=dv, DV_P=dv_p, num_warps=4))
    return out


def example_call(q_len: int, kv_len: int, pmap: PairMap, *, heads: int = 32, kv_heads: int = 8, dim: int = 128,
                 dtype: torch.dtype = torch.bfloat16, log_scale: bool = True):
    """(function, args, kwargs) of a call with these shapes on CPU tensors (the values do not matter): for
    :mod:`longctx.kernels.offline`."""
    from longctx.core.rope import default_inv_freq

    q = torch.zeros(1, heads, q_len, dim, dtype=dtype)
    k = torch.zeros(1, kv_heads, kv_len, dim, dtype=dtype)
    pos = torch.arange(kv_len)[None]
    layout = row_layout(pos[:, kv_len - q_len:], pos, None, q_len, kv_len)
    keys = {v: k.clone() for v in set(pmap.variants)}
    q_scale = torch.ones(1, q_len) if log_scale else None
    return pairmap_attention_triton, (q, k.clone(), pmap, default_inv_freq(dim, 10000.0), dim**-0.5, keys, layout), \
        dict(q_scale=q_scale)

