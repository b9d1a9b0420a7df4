"""SelfExtend attention as one Triton kernel: flash-attention's online softmax over K/V tiles, forward only.

Same contract as :func:`longctx.kernels.selfextend_torch.selfextend_attention` (q/k already rotated at their
positions, ``inv_freq`` the model's *unscaled* rotary frequencies), for the calls it supports (see :func:`supports`):
positions contiguous per row (position = slot + a per-row offset), valid keys one contiguous slot range per row
(left padding for decoders, right padding for encoders), full rotary dim, no softcap, fp16 / bf16 / fp32.

How the work is laid out:

- **Rows are (query, head) pairs of one KV head.** A program takes ``BLOCK_M`` rows of the ``rep = Hq / Hkv`` query
  heads that share a KV head, query-major, so each K/V tile is loaded once for all of them (GQA / MQA without
  repeating K/V); a decoding step with q_len = 1 still fills a tile with its ``rep`` heads.
- **Three kinds of key tiles** per row block of query slots ``[i_lo, i_hi]``: keys at distance ≥ W from every query
  of the block are *grouped* (grouped query × grouped key), keys within W of every query are *neighbours* (plain q·k),
  only the band between computes both and picks per pair. The band is about ``BLOCK_M / rep + W mod BLOCK_N`` keys
  wide, so the work is vanilla flash attention plus one or two extra tiles per row block. Whole tiles of keys that
  every row sees run unmasked (no per-score predicate: the loop is plain flash attention's); only partial tiles, the
  causal diagonal and the band pay for masks.
- **Rotations, in fp32 from inv_freq.** The query tile is rotated to its grouped position once per program (and to
  the mirror position for bidirectional attention). Grouped keys depend on their own position only: in prefill
  (compute-bound) they are rotated once per call into one K-sized buffer by a one-pass kernel (or supplied by the
  caller); in decode (memory-bound) the kernel rotates each loaded key tile itself, which costs no extra memory
  traffic.
- **Decode splits the KV length** (flash-decoding): each program takes a chunk of keys and writes a partial output
  and its log-sum-exp; a second small kernel merges the chunks. Softmax statistics and accumulation are fp32.

With ``group_size = 1`` and a window past the sequence every tile is a neighbour tile: the kernel is then plain
causal (or bidirectional) flash attention, the fair baseline for its own speed.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from longctx.core.positions import selfextend_shift

try:  # triton is optional: the torch path is the fallback (and the reference)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = None

__all__ = ["available", "supports", "row_layout", "selfextend_attention_triton", "grouped_keys_triton", "Unsupported",
           "HEAD_DIMS"]

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` is a constexpr function: slower to call from Python)."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The next power of two ≥ ``n`` (host side)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if _CAPTURED is not None:  # longctx.kernels.offline records the launches of CPU tensors: an H100 SXM's count
        return 132
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str) -> bool:
    """Triton can run here: a CUDA device, or any device under ``TRITON_INTERPRET=1`` (tests on CPU)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or interpreted()


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, inv_freq: torch.Tensor,
             softcap: float | None = None) -> str | None:
    """``None`` when the kernel takes this call, else why not (the caller falls back to the torch path). Position
    and padding layout are checked by :func:`selfextend_attention_triton` itself (they need the tensors' values)."""
    if triton is None:
        return "triton is not installed"
    if not available(query.device):
        return f"no Triton on device {query.device.type} (set TRITON_INTERPRET=1 to interpret on CPU)"
    if query.dtype not in DTYPES or not (query.dtype == key.dtype == value.dtype):
        return f"dtype {query.dtype} / {key.dtype} / {value.dtype} (supported: fp16, bf16, fp32, all the same)"
    dim = query.shape[-1]
    if dim not in HEAD_DIMS or value.shape[-1] not in HEAD_DIMS:
        return f"head dim {dim} (supported: {HEAD_DIMS})"
    if inv_freq.numel() * 2 != dim:
        return f"partial rotary ({inv_freq.numel() * 2} of {dim} dims)"
    if softcap:
        return "attention logit softcapping"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "gradients (the kernel is forward-only)"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads"
    return None


class Unsupported(ValueError):
    """The call's positions or padding do not fit the kernel; the caller falls back to the torch path."""


def row_layout(q_pos, k_pos, key_valid, q_len, kv_len):
    """Per-row position offset (position = slot + offset) and valid key range ``[lo, hi)``; raises
    :class:`Unsupported` when positions are not contiguous over the valid keys or the valid keys are not one range."""
    slots = torch.arange(kv_len, device=k_pos.device)
    offset = k_pos[:, -1] - (kv_len - 1)
    if key_valid is None:
        lo = torch.zeros_like(offset)
        hi = torch.full_like(offset, kv_len)
        valid = None
    else:
        valid = key_valid.bool()
        count = valid.sum(-1)
        lo = torch.where(count > 0, valid.to(torch.int64).argmax(-1), torch.zeros_like(count))
        hi = lo + count
        last = (hi - 1).clamp(min=0)
        offset = k_pos.gather(1, last[:, None])[:, 0] - last  # from the last valid key: padding may hold anything
    q_ok = q_pos == slots[kv_len - q_len:] + offset[:, None]
    if valid is None:
        checks = [q_ok.all(), (k_pos == slots + offset[:, None]).all()]
    else:  # padded slots may carry any position
        inside = (slots >= lo[:, None]) & (slots < hi[:, None])
        checks = [(q_ok | ~valid[:, kv_len - q_len:]).all(), (valid == inside).all(),
                  ((k_pos == slots + offset[:, None]) | ~valid).all()]
    if not bool(torch.stack(checks).all()):  # one device sync
        raise Unsupported("positions are not contiguous per row or the valid keys are not one slot range")
    return offset.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32)


if triton is not None:

    @triton.jit
    def _rotate(x1, x2, angle):
        """Rotate-half RoPE of a tile split in halves, by ``angle`` (fp32, broadcast over rows)."""
        c = tl.cos(angle)
        s = tl.sin(angle)
        return x1 * c - x2 * s, x2 * c + x1 * s

    @triton.jit
    def _rotate_fast(x1, x2, angle):
        """As ``_rotate``, for the per-tile key rotation of decoding: the angle is first reduced to [−π, π] in
        fp32 (large angles otherwise take sin/cos's slow argument-reduction path), then the hardware's
        ``sin.approx`` / ``cos.approx`` (absolute error ≈ 1e-6 there, far below fp16 / bf16 rounding)."""
        a = angle - 6.283185307179586 * tl.floor(angle * 0.15915494309189535 + 0.5)
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [a], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [a], dtype=tl.float32, is_pure=True, pack=1)
        return x1 * c - x2 * s, x2 * c + x1 * s

    @triton.jit
    def _load_tile(ptr, rows, stride, cols, row_ok, col_ok, ROWS_MASKED: tl.constexpr, COLS_MASKED: tl.constexpr):
        """A ``[rows, cols]`` tile; masks only where asked (interior tiles load unmasked: no predicates)."""
        mask = None
        other = None
        if ROWS_MASKED:
            mask = row_ok[:, None]
            other = 0.0
            if COLS_MASKED:
                mask = mask & col_ok[None, :]
        elif COLS_MASKED:
            mask = col_ok[None, :]
            other = 0.0
        return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=other)

    @triton.jit
    def _dot_t(a, b, acc, FP32: tl.constexpr):
        """``acc + a · bᵀ``, fp32 accumulation (exact fp32 products for fp32 inputs)."""
        if FP32:
            return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        return tl.dot(a, tl.trans(b), acc)

    @triton.jit
    def _scores(a1, a2, b1, b2, FP32: tl.constexpr):
        """``a · bᵀ`` over both halves of the head dim (decode: keys rotated here come in halves)."""
        return _dot_t(a2, b2, _dot_t(a1, b1, None, FP32), FP32)

    @triton.jit
    def _cat_halves(a, b, ROWS: tl.constexpr, HALF_P: tl.constexpr):
        """``[a | b]``: two ``[ROWS, HALF_P]`` halves as one tile (prefill: one product over the whole head dim per
        key tile, a single tensor-core chain instead of two with a wait between)."""
        return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (ROWS, 2 * HALF_P))

    @triton.jit
    def _whole_cols(HALF: tl.constexpr, HALF_P: tl.constexpr):
        """Source columns of a whole-head-dim tile laid out as ``[first half | second half]``, each padded to
        ``HALF_P`` (the layout :func:`_cat_halves` gives queries), and which are real."""
        c = tl.arange(0, 2 * HALF_P)
        src = c
        if HALF != HALF_P:
            src = (c // HALF_P) * HALF + c % HALF_P
        return src, c % HALF_P < HALF

    @triton.jit
    def _softmax_step(acc, m_i, l_i, s, row_scale, v_ptr, j, svn, offs_v, jm, vmask, DV: tl.constexpr,
                      DV_P: tl.constexpr, FP32: tl.constexpr, MASKED: tl.constexpr):
        """One key tile of flash attention's online softmax (scores ``s``, the values of keys ``j``): ``(acc, m, l)``
        updated. Scale > 0, so max(s)·scale = max(s·scale) and s·scale − m is one FMA per score; ``MASKED``: a row may
        have seen no key yet (its max is −inf). Shared by the SelfExtend and pair-map kernels."""
        m_new = tl.maximum(m_i, tl.max(s, 1) * row_scale)
        m_use = m_new
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * row_scale[:, None] - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr, j, svn, offs_v, jm, vmask, MASKED, DV != DV_P)
        if FP32:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, l_i

    @triton.jit
    def _tiles(acc, m_i, l_i, q1, q2, ql1, ql2, qr1, qr2, row_scale, i_slot, lo, hi,
               k_ptr, v_ptr, g_ptr, freq, pos_off, group, window, skn, svn, sgn,
               MODE: tl.constexpr, CAUSAL: tl.constexpr, PRE_KG: tl.constexpr, HALF: tl.constexpr,
               HALF_P: tl.constexpr, DV_P: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
               FP32: tl.constexpr, FAST_TRIG: tl.constexpr, MASKED: tl.constexpr, WHOLE: tl.constexpr):
        """Online softmax over key tiles ``[lo, hi)``. MODE 0: neighbour scores only; 1: grouped (left) only;
        2: grouped mirror (right, bidirectional) only; 3: the band — every score kind needed, picked per pair.
        ``WHOLE`` (causal prefill in fp16 / bf16, head dim ≤ 128): ``q1`` / ``ql1`` are whole-head-dim query tiles
        (``q2`` / ``ql2`` unused) and each score is one product over the whole head dim; otherwise scores are summed
        over the two halves, and decode (not ``PRE_KG``) rotates each key tile to its grouped positions here.

        ``MASKED=False`` is the interior: every tile is whole (``hi − lo`` a multiple of ``BLOCK_N``) and every key
        visible to every row, so no predicate is computed — the loop is plain flash attention's (scale and max
        subtraction in one FMA). ``MASKED=True`` takes partial tiles, the causal diagonal and the band."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, HALF_P)
        offs_v = tl.arange(0, DV_P)
        hmask = offs_h < HALF
        vmask = offs_v < DV
        cols, cmask = _whole_cols(HALF, HALF_P)
        for start in range(lo, hi, BLOCK_N):
            j = start + offs_n
            jm = j < hi
            if MODE == 0 or MODE == 3:
                if WHOLE:
                    k = _load_tile(k_ptr, j, skn, cols, jm, cmask, MASKED, HALF != HALF_P)
                    s_n = _dot_t(q1, k, None, FP32)
                else:
                    k1 = _load_tile(k_ptr, j, skn, offs_h, jm, hmask, MASKED, HALF != HALF_P)
                    k2 = _load_tile(k_ptr + HALF, j, skn, offs_h, jm, hmask, MASKED, HALF != HALF_P)
                    s_n = _scores(q1, q2, k1, k2, FP32)
            if MODE != 0:
                if WHOLE:
                    g = _load_tile(g_ptr, j, sgn, cols, jm, cmask, MASKED, HALF != HALF_P)
                    if MODE == 1 or MODE == 3:
                        s_l = _dot_t(ql1, g, None, FP32)
                else:
                    if PRE_KG:
                        g1 = _load_tile(g_ptr, j, sgn, offs_h, jm, hmask, MASKED, HALF != HALF_P)
                        g2 = _load_tile(g_ptr + HALF, j, sgn, offs_h, jm, hmask, MASKED, HALF != HALF_P)
                    else:  # rotate the key tile to its grouped positions here: decode is memory-bound
                        if MODE != 3:
                            k1 = _load_tile(k_ptr, j, skn, offs_h, jm, hmask, MASKED, HALF != HALF_P)
                            k2 = _load_tile(k_ptr + HALF, j, skn, offs_h, jm, hmask, MASKED, HALF != HALF_P)
                        kp = j + pos_off
                        dk = (kp // group - kp).to(tl.float32)
                        if FAST_TRIG:
                            a1, a2 = _rotate_fast(k1.to(tl.float32), k2.to(tl.float32), dk[:, None] * freq[None, :])
                        else:
                            a1, a2 = _rotate(k1.to(tl.float32), k2.to(tl.float32), dk[:, None] * freq[None, :])
                        g1 = a1.to(k1.dtype)
                        g2 = a2.to(k1.dtype)
                    if MODE == 1 or MODE == 3:
                        s_l = _scores(ql1, ql2, g1, g2, FP32)
                    if not CAUSAL:
                        if MODE == 2 or MODE == 3:
                            s_r = _scores(qr1, qr2, g1, g2, FP32)
            if MODE == 0:
                s = s_n
            elif MODE == 1:
                s = s_l
            elif MODE == 2:
                s = s_r
            if MASKED:
                dist = i_slot[:, None] - j[None, :]
                if MODE == 3:
                    s = tl.where(dist >= window, s_l, s_n)
                    if not CAUSAL:
                        s = tl.where(dist <= -window, s_r, s)
                ok = jm[None, :]
                if CAUSAL:
                    ok = ok & (dist >= 0)
                s = tl.where(ok, s, float("-inf"))
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, row_scale, v_ptr, j, svn, offs_v, jm, vmask, DV, DV_P,
                                          FP32, MASKED)
        return acc, m_i, l_i

    @triton.jit
    def _stage(acc, m_i, l_i, q1, q2, ql1, ql2, qr1, qr2, row_scale, i_slot, lo, hi, visible,
               k_ptr, v_ptr, g_ptr, freq, pos_off, group, window, skn, svn, sgn,
               MODE: tl.constexpr, CAUSAL: tl.constexpr, PRE_KG: tl.constexpr, HALF: tl.constexpr,
               HALF_P: tl.constexpr, DV_P: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
               FP32: tl.constexpr, FAST_TRIG: tl.constexpr, WHOLE: tl.constexpr):
        """Keys ``[lo, hi)`` of one kind: whole tiles below ``visible`` (keys every row sees) unmasked, the rest
        (a partial tile, the causal diagonal) masked."""
        whole = lo + (tl.maximum(tl.minimum(hi, visible) - lo, 0) // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _tiles(acc, m_i, l_i, q1, q2, ql1, ql2, qr1, qr2, row_scale, i_slot, lo, whole,
                               k_ptr, v_ptr, g_ptr, freq, pos_off, group, window, skn, svn, sgn,
                               MODE, CAUSAL, PRE_KG, HALF, HALF_P, DV_P, DV, BLOCK_N, FP32, FAST_TRIG, False, WHOLE)
        acc, m_i, l_i = _tiles(acc, m_i, l_i, q1, q2, ql1, ql2, qr1, qr2, row_scale, i_slot, whole, hi,
                               k_ptr, v_ptr, g_ptr, freq, pos_off, group, window, skn, svn, sgn,
                               MODE, CAUSAL, PRE_KG, HALF, HALF_P, DV_P, DV, BLOCK_N, FP32, FAST_TRIG, True, WHOLE)
        return acc, m_i, l_i

    @triton.jit
    def _program_rows(POS_OFF, KV_LO, KV_HI, hkv, q_len, kv_len, REP: tl.constexpr, BLOCK_M: tl.constexpr):
        """What a program of the attention kernels works on: ``(batch, KV head, KV split, the row's position offset,
        its valid key range lo / hi, which rows are real, their query slot index t, head, and key slot i)``. Rows
        are the (query, head) pairs of one KV head, query-major. Row blocks run last to first: causal blocks further
        down see more keys, so the heaviest are dispatched first and the grid's last wave is light (the blocks of
        one KV head still run together and share its K / V in L2)."""
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // hkv
        kvh = pid_bh % hkv
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row = query t · REP + head within the group
        t = rows // REP
        return (b, kvh, tl.program_id(2), tl.load(POS_OFF + b), tl.load(KV_LO + b), tl.load(KV_HI + b),
                rows < q_len * REP, t, kvh * REP + rows % REP, t + (kv_len - q_len))

    @triton.jit
    def _store_rows(acc, m_i, l_i, OUT, O_WS, LSE_WS, b, head, t, row_ok, pid_s, hkv, q_len, sob, soh, som,
                    REP: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr, SPLIT: tl.constexpr):
        """The rows' normalised output to ``OUT``, or (split KV) the partial output and its log2-sum-exp to the
        workspaces, merged by :func:`_merge_splits`."""
        offs_v = tl.arange(0, DV_P)
        safe_l = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / safe_l[:, None]
        if SPLIT:
            ws = ((b * hkv * REP + head) * q_len + t) * tl.num_programs(2) + pid_s
            tl.store(O_WS + ws[:, None] * DV_P + offs_v[None, :], out, mask=row_ok[:, None])
            lse = tl.where(l_i > 0.0, m_i + tl.log2(safe_l), float("-inf"))
            tl.store(LSE_WS + ws, lse, mask=row_ok)
        else:
            o_ptr = OUT + b * sob + head[:, None] * soh + t[:, None] * som + offs_v[None, :]
            tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_v < DV)[None, :])

    @triton.jit
    def _selfextend_fwd(
        Q, K, V, KG, FREQ, POS_OFF, KV_LO, KV_HI, OUT, O_WS, LSE_WS,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn, sob, soh, som,
        hkv, q_len, kv_len, chunk, qk_scale, group, window, shift, log_base_inv,
        REP: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRE_KG: tl.constexpr,
        LOG_SCALE: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr, FAST_TRIG: tl.constexpr,
        WHOLE: tl.constexpr,
    ):
        b, kvh, pid_s, pos_off, kv_lo, kv_hi, row_ok, t, head, i_slot = _program_rows(
            POS_OFF, KV_LO, KV_HI, hkv, q_len, kv_len, REP, BLOCK_M)
        offs_h = tl.arange(0, HALF_P)
        hmask = offs_h < HALF
        qmask = row_ok[:, None] & hmask[None, :]
        q_ptr = Q + b * sqb + head[:, None] * sqh + t[:, None] * sqm + offs_h[None, :]
        q1 = tl.load(q_ptr, mask=qmask, other=0.0)
        q2 = tl.load(q_ptr + HALF, mask=qmask, other=0.0)
        freq = tl.load(FREQ + offs_h, mask=hmask, other=0.0)

        # grouped query positions: p // G + shift (left), p // G − shift (right, bidirectional); rotate by the delta
        pos = i_slot + pos_off
        base = (pos // group).to(tl.float32) - pos.to(tl.float32)
        ql1, ql2 = _rotate(q1.to(tl.float32), q2.to(tl.float32), (base + shift)[:, None] * freq[None, :])
        ql1 = ql1.to(q1.dtype)
        ql2 = ql2.to(q1.dtype)
        qr1 = ql1
        qr2 = ql2
        if not CAUSAL:
            r1, r2 = _rotate(q1.to(tl.float32), q2.to(tl.float32), (base - shift)[:, None] * freq[None, :])
            qr1 = r1.to(q1.dtype)
            qr2 = r2.to(q1.dtype)
        if WHOLE:  # whole-head-dim query tiles: one tensor-core chain per score tile, no wait between halves
            q1 = _cat_halves(q1, q2, BLOCK_M, HALF_P)
            ql1 = _cat_halves(ql1, ql2, BLOCK_M, HALF_P)
        row_scale = tl.zeros((BLOCK_M,), tl.float32) + qk_scale
        if LOG_SCALE:  # LongLM's max(1, ln(p + 1) / ln(scale_base)) on the query
            row_scale = row_scale * tl.maximum(tl.log(pos.to(tl.float32) + 1.0) * log_base_inv, 1.0)

        # this program's keys: the split's chunk, the row's valid range, and (causal) up to the last query
        i_lo = tl.min(tl.where(row_ok, i_slot, kv_len), 0)
        i_hi = tl.max(tl.where(row_ok, i_slot, 0), 0)
        lo = tl.maximum(kv_lo, pid_s * chunk)
        hi = tl.minimum(kv_hi, pid_s * chunk + chunk)
        if CAUSAL:
            hi = tl.minimum(hi, i_hi + 1)
        k_ptr = K + b * skb + kvh * skh
        v_ptr = V + b * svb + kvh * svh
        g_ptr = KG + b * sgb + kvh * sgh

        acc = tl.zeros((BLOCK_M, DV_P), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # key ranges by kind: grouped for every row (j ≤ i_lo − W), the band, neighbours for every row
        g_end = tl.maximum(lo, tl.minimum(hi, i_lo - window + 1))
        n_start = tl.maximum(g_end, tl.minimum(hi, i_hi - window + 1))
        # causal: every key up to hi is behind the queries, so the neighbours run to hi. Bidirectional, right of
        # the neighbours: the mirror band [n_end, r_end), then keys ≥ i_hi + W, grouped-right for every row
        n_end = hi
        if not CAUSAL:
            n_end = tl.maximum(n_start, tl.minimum(hi, i_lo + window))
        # keys every row of the block sees: causal, those up to the first query; bidirectional, all of them
        visible = hi
        if CAUSAL:
            visible = i_lo + 1
        acc, m_i, l_i = _stage(acc, m_i, l_i, q1, q2, ql1, ql2, qr1, qr2, row_scale, i_slot, lo, g_end, g_end,
                               k_ptr, v_ptr, g_ptr, freq, pos_off, group, window, skn, svn, sgn,
                               1, CAUSAL, PRE_KG, HALF, HALF_P, DV_P, DV, BLOCK_N, FP32, FAST_TRIG, WHOLE)
        acc, m_i, l_i = _tiles(acc, m_i, l_i, q1, q2, ql1, ql2, qr1, qr2, row_scale, i_slot, g_end, n_start,
                               k_ptr, v_ptr, g_ptr, freq, pos_off, group, window, skn, svn, sgn,
                               3, CAUSAL, PRE_KG, HALF, HALF_P, DV_P, DV, BLOCK_N, FP32, FAST_TRIG, True, WHOLE)
        acc, m_i, l_i = _stage(acc, m_i, l_i, q1, q2, ql1, ql2, qr1, qr2, row_scale, i_slot, n_start, n_end, visible,
                               k_ptr, v_ptr, g_ptr, freq, pos_off, group, window, skn, svn, sgn,
                               0, CAUSAL, PRE_KG, HALF, HALF_P, DV_P, DV, BLOCK_N, FP32, FAST_TRIG, WHOLE)
        if not CAUSAL:
            r_end = tl.maximum(n_end, tl.minimum(hi, i_hi + window))
            acc, m_i, l_i = _tiles(acc, m_i, l_i, q1, q2, ql1, ql2, qr1, qr2, row_scale, i_slot, n_end, r_end,
                                   k_ptr, v_ptr, g_ptr, freq, pos_off, group, window, skn, svn, sgn,
                                   3, CAUSAL, PRE_KG, HALF, HALF_P, DV_P, DV, BLOCK_N, FP32, FAST_TRIG, True, WHOLE)
            acc, m_i, l_i = _stage(acc, m_i, l_i, q1, q2, ql1, ql2, qr1, qr2, row_scale, i_slot, r_end, hi, hi,
                                   k_ptr, v_ptr, g_ptr, freq, pos_off, group, window, skn, svn, sgn,
                                   2, CAUSAL, PRE_KG, HALF, HALF_P, DV_P, DV, BLOCK_N, FP32, FAST_TRIG, WHOLE)

        _store_rows(acc, m_i, l_i, OUT, O_WS, LSE_WS, b, head, t, row_ok, pid_s, hkv, q_len, sob, soh, som,
                    REP, DV, DV_P, SPLIT)

    @triton.jit
    def _merge_splits(O_WS, LSE_WS, OUT, sob, soh, som, heads, q_len, splits,
                      S_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr):
        """One program per (batch, head, query): log-sum-exp merge of the split partials."""
        pid = tl.program_id(0)
        t = pid % q_len
        head = (pid // q_len) % heads
        b = pid // (q_len * heads)
        offs_s = tl.arange(0, S_P)
        offs_v = tl.arange(0, DV_P)
        smask = offs_s < splits
        lse = tl.load(LSE_WS + pid * splits + offs_s, mask=smask, other=float("-inf"))
        m = tl.max(lse, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m_use)
        o = tl.load(O_WS + (pid * splits + offs_s)[:, None] * DV_P + offs_v[None, :], mask=smask[:, None], other=0.0)
        total = tl.sum(w, 0)
        out = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
        tl.store(OUT + b * sob + head * soh + t * som + offs_v, out.to(OUT.dtype.element_ty), mask=offs_v < DV)

    @triton.jit
    def _grouped_keys_fwd(K, KG, FREQ, POS_OFF, skb, skh, skn, sgb, sgh, sgn, hkv, kv_len, group,
                          HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK: tl.constexpr):
        """Keys rotated at ``slot + offset`` re-rotated to their grouped positions ``⌊p / G⌋``, one pass: the
        angle ``(⌊p / G⌋ − p) · inv_freq`` in fp32, precise sin / cos, stored in the keys' dtype."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // hkv
        h = pid_bh % hkv
        j = pid_n * BLOCK + tl.arange(0, BLOCK)
        offs_h = tl.arange(0, HALF_P)
        hmask = offs_h < HALF
        mask = (j < kv_len)[:, None] & hmask[None, :]
        pos = j + tl.load(POS_OFF + b)
        pos = tl.maximum(pos, 0)  # padded slots of a left-padded row: any position will do, keep it defined
        angle = (pos // group - pos).to(tl.float32)[:, None] * tl.load(FREQ + offs_h, mask=hmask, other=0.0)[None, :]
        src = K + b * skb + h * skh + j[:, None] * skn + offs_h[None, :]
        k1 = tl.load(src, mask=mask, other=0.0)
        k2 = tl.load(src + HALF, mask=mask, other=0.0)
        g1, g2 = _rotate(k1.to(tl.float32), k2.to(tl.float32), angle)
        dst = KG + b * sgb + h * sgh + j[:, None] * sgn + offs_h[None, :]
        tl.store(dst, g1.to(KG.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, g2.to(KG.dtype.element_ty), mask=mask)


def grouped_keys_triton(key: torch.Tensor, offset: torch.Tensor, inv_freq: torch.Tensor, group_size: int,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``key [B, Hkv, kv, D]`` (rotated at positions ``slot + offset[b]``) re-rotated to the grouped positions, as
    :func:`longctx.kernels.selfextend_torch.grouped_keys` computes it, in one kernel pass (no cos / sin tables, no
    fp32 copies, no device sync). ``out`` (same shape, may be a strided view) receives the result."""
    batch, hkv, kv_len, dim = key.shape
    if out is None:
        out = torch.empty_like(key)
    if kv_len == 0:
        return out
    freq = inv_freq.to(device=key.device, dtype=torch.float32).contiguous()
    half = dim // 2
    block = 16 if interpreted() else (64 if half <= 64 else 16)  # precise sin / cos: keep the tile in registers
    _launch(_grouped_keys_fwd, (_cdiv(kv_len, block), batch * hkv),
            (key, out, freq, offset.to(device=key.device, dtype=torch.int32), *key.stride()[:3], *out.stride()[:3],
             hkv, kv_len, group_size),
            dict(HALF=half, HALF_P=_pow2(max(16, half)), BLOCK=block, num_warps=4))
    return out


def _tuned() -> bool:
    """Autotune the tile shapes on first use of a shape class (compiled GPUs only; ``LONGCTX_TRITON_TUNE=0`` takes
    the first configuration, as the test suite does to keep compile time down)."""
    return not interpreted() and os.environ.get("LONGCTX_TRITON_TUNE", "1") != "0"


# prefill: (BLOCK_M, BLOCK_N, warps, stages), the first is the untuned default. Chosen from what the compiler
# makes of them for sm_90 (``python -m longctx.kernels.offline``): each fits in shared memory without spilling.
# Causal, bf16 / fp16, head dim ≤ 128: 128×128 tiles or 4 stages need 256 KiB of shared memory, 128×64 on 4 warps
# spills. Bidirectional holds a third (mirrored) query tile: 128×64 on 3 stages needs 240 KiB, so 32-key tiles.
_PREFILL = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)]
_PREFILL_BIDIRECTIONAL = [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3)]
# head dim 256: larger tiles spill hundreds of bytes per thread (64×64 does not fit at all)
_PREFILL_WIDE = [(32, 32, 4, 2), (64, 32, 4, 2)]
# fp32 (exact products, no tensor cores): 32×32 tiles on 8 warps stay in registers (on 4 warps triton 3.6 spills
# 72 bytes per thread); at head dim 256 only 16-row tiles do (32×32 spilled 3.5 KiB per thread)
_PREFILL_FP32 = [(32, 32, 8, 2)]
_PREFILL_FP32_WIDE = [(16, 32, 8, 2)]
# decode: one configuration per shape class, no autotuner (its dispatch costs more than a step's kernel at short
# caches); (BLOCK_N, warps, stages), BLOCK_M fits the rows. 64-key tiles on 4 warps and 3 stages spill at head dim
# 256 and in fp32 (3 KiB per thread at head dim 128), and fp32 at head dim 256 needs 352 KiB of shared memory there
# (does not launch: found on an H200 with triton 3.6)
_DECODE = {"": (64, 4, 3), "bidirectional": (64, 4, 3), "wide": (64, 8, 2), "fp32": (32, 8, 2),
           "fp32-wide": (16, 8, 2)}
CHUNK_ALIGN = 128  # split chunks are multiples of every BLOCK_N


def _configs(kind: str, shapes: str = "") -> list[dict]:
    """Launch configurations for ``kind`` ("prefill" / "decode") and ``shapes`` class ("", "bidirectional",
    "wide", "fp32", "fp32-wide"): prefill's tile shapes (autotuned over when there is more than one: tuning on a
    compiled GPU), decode's one; tiny tiles in the interpreter."""
    if interpreted():
        return [{"BLOCK_N": 16, "num_warps": 4, "num_stages": 1} | ({} if kind == "decode" else {"BLOCK_M": 16})]
    if kind == "decode":
        return [dict(zip(("BLOCK_N", "num_warps", "num_stages"), _DECODE[shapes]))]
    table = {"": _PREFILL, "bidirectional": _PREFILL_BIDIRECTIONAL, "wide": _PREFILL_WIDE, "fp32": _PREFILL_FP32,
             "fp32-wide": _PREFILL_FP32_WIDE}
    return [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st}
            for m, n, w, st in (table[shapes] if _tuned() else table[shapes][:1])]


def _shape_class(fp32: bool, dim: int, causal: bool) -> str:
    if fp32:
        return "fp32-wide" if dim > 128 else "fp32"
    if dim > 128:
        return "wide"
    return "" if causal else "bidirectional"


def _launch_fwd(kind: str, shapes: str, grid, args: tuple, meta: dict) -> None:
    """Launch the attention kernel for ``kind`` with its configuration(s) (see :func:`_configs`)."""
    configs = _configs(kind, shapes)
    if _CAPTURED is not None:
        _CAPTURED.append((_selfextend_fwd, grid, args, meta, configs))
        return
    if len(configs) == 1:
        _selfextend_fwd[grid](*args, **configs[0], **meta)
        return
    key = (kind, shapes)
    if key not in _AUTOTUNED:
        tune = [triton.Config({k: v for k, v in c.items() if k.isupper()}, num_warps=c["num_warps"],
                              num_stages=c["num_stages"]) for c in configs]
        _AUTOTUNED[key] = triton.autotune(configs=tune, key=["HALF", "DV", "FP32", "CAUSAL", "REP"])(_selfextend_fwd)
    _AUTOTUNED[key][grid](*args, **meta)


def _launch(kernel, grid, args: tuple, meta: dict) -> None:
    """Launch a kernel with a fixed configuration (recorded instead while :mod:`longctx.kernels.offline` captures)."""
    if _CAPTURED is not None:
        _CAPTURED.append((kernel, grid, args, meta, [{}]))
        return
    kernel[grid](*args, **meta)


_AUTOTUNED: dict = {}
# set to a list by longctx.kernels.offline: launches are recorded (kernel, grid, args, meta, configs), not run
_CAPTURED: list | None = None


def selfextend_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    inv_freq: torch.Tensor,
    group_size: int,
    window: int,
    scaling: float,
    *,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,
    shift: str = "int",
    scale_base: float | None = None,
    grouped_key: torch.Tensor | None = None,
    splits: int | None = None,
    layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SelfExtend attention with the Triton kernel, ``[B, Hq, q, Dv]`` in ``query.dtype`` (a view of a
    ``[B, q, Hq, Dv]`` buffer: transposing it back, as attention functions do, costs no copy).

    ``grouped_key`` optionally supplies the keys already rotated to their grouped positions (prefill); decoding
    (q ≤ 16) rotates keys inside the kernel. ``splits`` sets the number of KV chunks (default: enough programs to
    fill the GPU when the query is short, else 1). ``layout`` = (position offset, first valid key, end of valid keys)
    per row, from :func:`row_layout`, skips the checks (the layout's device sync and :func:`supports`): a caller
    passing it has run them, and ``q_pos`` / ``k_pos`` / ``key_valid`` are then not read (may be None). Raises
    :class:`Unsupported` for positions / padding the kernel does not take; :func:`supports` checks the rest.
    """
    if layout is None:  # a caller passing the layout has run these checks (the model integration does, once)
        why = supports(query, key, value, inv_freq)
        if why is not None:
            raise Unsupported(why)
    batch, hq, q_len, dim = query.shape
    hkv, kv_len, dv = key.shape[1], key.shape[2], value.shape[-1]
    rep = hq // hkv
    offset, lo, hi = layout if layout is not None else row_layout(q_pos, k_pos, key_valid, q_len, kv_len)
    decode = q_len <= 16
    freq = inv_freq.to(device=query.device, dtype=torch.float32).contiguous()
    pre_kg = not decode
    if pre_kg and grouped_key is None and group_size > 1:
        grouped_key = grouped_keys_triton(key, offset, freq, group_size)
    kg = grouped_key if grouped_key is not None else key
    rows = rep * q_len
    decode_m = 16 if interpreted() else max(16, min(64, _pow2(rows)))
    if splits is None:
        splits = 1
        if decode and not interpreted():
            sms = _sm_count(query.device)
            programs = batch * hkv * _cdiv(rows, decode_m)
            splits = max(1, min(_cdiv(kv_len, 256), _cdiv(4 * sms, programs)))
    chunk = _cdiv(_cdiv(kv_len, splits), CHUNK_ALIGN) * CHUNK_ALIGN
    splits = _cdiv(kv_len, chunk)
    out = torch.empty(batch, q_len, hq, dv, device=query.device, dtype=query.dtype).transpose(1, 2)
    split = splits > 1
    dv_p = _pow2(max(16, dv))
    if split:
        o_ws = torch.empty(batch * hq * q_len * splits, dv_p, device=query.device, dtype=torch.float32)
        lse_ws = torch.empty(batch * hq * q_len * splits, device=query.device, dtype=torch.float32)
    else:
        o_ws = lse_ws = out
    half = dim // 2
    log_base_inv = 1.0 / math.log(scale_base) if scale_base else 0.0
    win = window if group_size > 1 else kv_len + q_len + 1  # G = 1: every pair is a neighbour pair
    fp32 = query.dtype == torch.float32
    extra = {"BLOCK_M": decode_m} if decode else {}
    _launch_fwd(
        "decode" if decode else "prefill", _shape_class(fp32, dim, causal),
        lambda meta: (_cdiv(rows, meta["BLOCK_M"]), batch * hkv, splits),
        (query, key, value, kg, freq, offset, lo, hi, out, o_ws, lse_ws,
         *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *kg.stride()[:3], *out.stride()[:3],
         hkv, q_len, kv_len, chunk, scaling * LOG2E, group_size, win, selfextend_shift(group_size, window, shift),
         log_base_inv),
        dict(REP=rep, HALF=half, HALF_P=_pow2(max(16, half)), DV=dv, DV_P=dv_p, CAUSAL=causal, PRE_KG=pre_kg,
             LOG_SCALE=bool(scale_base), SPLIT=split, FP32=fp32, FAST_TRIG=not (fp32 or interpreted()),
             WHOLE=pre_kg and causal and not fp32 and dim <= 128, **extra),
    )
    if split:
        _launch(_merge_splits, (batch * hq * q_len,), (o_ws, lse_ws, out, *out.stride()[:3], hq, q_len, splits),
                dict(S_P=_pow2(max(2, splits)), DV=dv, DV_P=dv_p, num_warps=4))
    return out
