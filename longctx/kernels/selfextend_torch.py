"""SelfExtend attention in PyTorch: the blocked O(n)-memory path (CPU fallback, reference for kernels) and the naive
two-full-maps path (the test oracle, LongLM's formulation).

Inputs are plain tensors: ``query [B, Hq, q, D]`` and ``key [B, Hkv, kv, D]`` already rotated by RoPE at their
positions ``q_pos [B, q]`` / ``k_pos [B, kv]``; ``value [B, Hkv, kv, Dv]``; ``inv_freq`` the model's *unscaled*
rotary inverse frequencies (fp32, rotary dim / 2). Grouped rotations are applied as a rotation by the position delta
(RoPE rotations compose), so q/k are never un-rotated. Scores, softmax and the value merge run in fp32.
"""

from __future__ import annotations

import math

import torch

from longctx.core.positions import selfextend_key_positions, selfextend_query_positions, selfextend_shift
from longctx.core.rope import apply_rotation, rotate_by_angles, rotation_tables

from .lse import attend, masked_softmax, merge, native_lse, records_grad

__all__ = [
    "selfextend_attention",
    "selfextend_attention_blocked",
    "selfextend_attention_fused",
    "selfextend_attention_lse",
    "grouped_keys",
    "selfextend_attention_naive",
    "log_scale",
]


def log_scale(q_pos: torch.Tensor, scale_base: float) -> torch.Tensor:
    """LongLM's query scaling ``max(1, ln(i + 1) / ln(scale_base))`` per query position, fp32 ``[B, q]``."""
    return (torch.log(q_pos.float() + 1) / math.log(scale_base)).clamp(min=1)


class _KeyTables:
    """cos/sin of the grouped key rotation, kept from the previous call: every layer of a forward (and of a decode
    step) sees the same key positions, so the tables are computed once per forward instead of once per layer."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, k_pos: torch.Tensor, inv_freq: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is not None:
            pos, freq, g = self.key
            if (g == group_size and pos.shape == k_pos.shape and pos.device == k_pos.device
                    and freq.shape == inv_freq.shape and torch.equal(pos, k_pos) and torch.equal(freq, inv_freq)):
                return self.tables
        dk = selfextend_key_positions(k_pos, group_size) - k_pos.float()
        self.tables = rotation_tables(dk[:, None, :, None] * inv_freq)
        self.key = (k_pos.clone(), inv_freq.clone(), group_size)
        return self.tables


_KEY_TABLES = _KeyTables()


def grouped_keys(key: torch.Tensor, k_pos: torch.Tensor, inv_freq: torch.Tensor, group_size: int) -> torch.Tensor:
    """Keys (rotated at ``k_pos``) re-rotated to their grouped positions ``k_pos // G``, in ``key.dtype``."""
    inv_freq = inv_freq.to(device=key.device, dtype=torch.float32)
    return apply_rotation(key, *_KEY_TABLES.get(k_pos, inv_freq, group_size))


def _grouped(query, key, q_pos, k_pos, inv_freq, group_size, window, shift, bidirectional, grouped_key=None):
    inv_freq = inv_freq.to(device=query.device, dtype=torch.float32)
    dq = selfextend_query_positions(q_pos, group_size, window, shift) - q_pos.float()
    q_left = rotate_by_angles(query, dq[:, None, :, None] * inv_freq)
    k_g = grouped_key if grouped_key is not None else grouped_keys(key, k_pos, inv_freq, group_size)
    q_right = None
    if bidirectional:  # keys W or more to the right: the mirror image, query at i // G − shift
        dq_right = dq - 2 * selfextend_shift(group_size, window, shift)
        q_right = rotate_by_angles(query, dq_right[:, None, :, None] * inv_freq)
    return q_left, q_right, k_g


def _allowed(q_len, kv_len, qs, qe, ks, ke, causal, key_valid, device):
    """Which (query, key) slots may attend: causal by slot (queries are the last q_len slots) and valid keys."""
    allowed = None
    if causal:
        qi = torch.arange(qs, qe, device=device)[:, None] + (kv_len - q_len)
        kj = torch.arange(ks, ke, device=device)[None, :]
        allowed = (kj <= qi)[None]  # [1, bq, bk]
    if key_valid is not None:
        kv_ok = key_valid[:, None, ks:ke]  # [B, 1, bk]
        allowed = kv_ok if allowed is None else allowed & kv_ok
    return allowed


def selfextend_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    inv_freq: torch.Tensor,
    group_size: int,
    window: int,
    scaling: float,
    *,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,
    shift: str = "int",
    scale_base: float | None = None,
    softcap: float | None = None,
    block_size: int | None = None,
    grouped_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """SelfExtend attention, ``[B, Hq, q, Dv]`` in ``query.dtype``. All paths are exact (see the module docstring):

    - causal, positions contiguous per row, no padding, no softcap: the log-sum-exp path
      (:func:`selfextend_attention_lse`) — on CPU for any query length, elsewhere for decoding (q ≤ 16);
    - causal prefill with padding (or off CPU): the fused-SDPA path (:func:`selfextend_attention_fused`);
    - anything else (bidirectional, softcap, non-contiguous positions): the blocked path.

    ``grouped_key`` optionally supplies the keys already re-rotated to their grouped positions (see
    :func:`grouped_keys`; the integration keeps them across decoding steps so cached keys are rotated once).
    """
    kwargs = dict(shift=shift, scale_base=scale_base, block_size=block_size, grouped_key=grouped_key)
    contiguous = causal and _contiguous(k_pos, key_valid)
    small_q = query.shape[2] <= 16
    same_dims = value.shape[-1] == query.shape[-1]
    if contiguous and not softcap and same_dims:
        unpadded = key_valid is None or bool(key_valid.all())
        if unpadded and (small_q or native_lse(query)):
            return selfextend_attention_lse(query, key, value, q_pos, k_pos, inv_freq, group_size, window, scaling,
                                            **kwargs)
        if not small_q and (unpadded or not records_grad(query, key, value)):  # SDPA: NaN grads on empty rows
            return selfextend_attention_fused(query, key, value, q_pos, k_pos, inv_freq, group_size, window,
                                              scaling, key_valid=key_valid, **kwargs)
    return selfextend_attention_blocked(query, key, value, q_pos, k_pos, inv_freq, group_size, window, scaling,
                                        causal=causal, key_valid=key_valid, softcap=softcap, contiguous=contiguous,
                                        **kwargs)


class _MaskCache:
    """Additive masks of the two masked key ranges of a query block, kept by shape: in a prefill every block past the
    first W tokens has the same pattern (and every layer the same blocks), so few are ever built."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self.entries: dict = {}

    def get(self, grouped: bool, q0: int, rows: int, width: int, window: int, rep: int, dtype, device):
        """Mask for query slots ``q0 … q0 + rows − 1`` against key slots ``0 … width − 1`` (relative to the range
        start): grouped pairs (distance ≥ W) or causal neighbour pairs (0 ≤ distance < W). Returns
        ``(additive mask [1, 1, rep·rows, width] or None when all pairs are allowed, rows without any allowed key)``."""
        key = (grouped, q0, rows, width, window, rep, dtype, device)
        hit = self.entries.pop(key, None)
        if hit is None:
            i = torch.arange(q0, q0 + rows, device=device)[:, None]
            j = torch.arange(width, device=device)[None]
            ok = (i - j >= window) if grouped else ((i - j < window) & (j <= i))
            if bool(ok.all()):
                hit = (None, None)
            else:
                mask = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, float("-inf"))
                empty = ~ok.any(-1)
                hit = (mask.repeat(rep, 1)[None, None], empty.repeat(rep) if bool(empty.any()) else None)
            if len(self.entries) >= self.capacity:
                self.entries.pop(next(iter(self.entries)))
        self.entries[key] = hit  # most recently used last
        return hit


_MASKS = _MaskCache()


def selfextend_attention_lse(
    query, key, value, q_pos, k_pos, inv_freq, group_size, window, scaling, *, shift="int", scale_base=None,
    block_size=None, grouped_key=None,
) -> torch.Tensor:
    """Causal SelfExtend as attention over three key ranges per query block, merged exactly by log-sum-exp.

    For the block's queries (slots ``first … last``): keys ``< first − W + 1`` are grouped for every query (one
    unmasked call with grouped q/k), keys ``first − W + 1 … last − W`` grouped for some queries (masked call),
    keys ``first − W + 1 … last`` neighbours for some (masked call with the causal band). Work is vanilla causal
    attention plus about ``1.5 · block · n`` scores; only grouped keys ``< q − W`` are re-rotated. GQA query heads
    are folded into rows (K/V never repeated). Needs positions contiguous per row, no padding, no softcap (the
    dispatcher checks). Merges in fp32.
    """
    batch, hq, q_len, dim = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    rep = hq // hkv
    offset = kv_len - q_len  # slot of query t is offset + t
    if scale_base is not None and scale_base > 0:
        query = query * log_scale(q_pos, scale_base)[:, None, :, None].to(query.dtype)
    g_len = max(0, kv_len - window)  # keys that are grouped for some query
    if g_len > 0:
        if grouped_key is None:
            grouped_key = grouped_keys(key[:, :, :g_len], k_pos[:, :g_len], inv_freq, group_size)
        q_left, _, _ = _grouped(query, key, q_pos, k_pos, inv_freq, group_size, window, shift, False, grouped_key)
    if block_size is None:  # measured on CPU (SmolLM2 shapes, 4k-16k tokens): 512 fastest from 8k on
        block_size = 512
    out = torch.empty_like(query)

    def rows(x, qs, qe):  # [B, Hq, bq, D] -> [B, Hkv, rep * bq, D]
        return x[:, :, qs:qe].reshape(batch, hkv, rep * (qe - qs), x.shape[-1])

    for qs in range(0, q_len, block_size):
        qe = min(q_len, qs + block_size)
        first, last = offset + qs, offset + qe - 1
        a = max(0, first - window + 1)  # keys < a: grouped for every query of the block
        g_end = max(a, last - window + 1)  # keys a … g_end − 1: grouped for some queries
        parts = []
        if a > 0:
            parts.append(attend(rows(q_left, qs, qe), grouped_key[:, :, :a], value[:, :, :a], None, scaling))
        for grouped, end in ((True, g_end), (False, last + 1)):
            if end <= a:
                continue
            mask, empty = _MASKS.get(grouped, first - a, qe - qs, end - a, window, rep, query.dtype, query.device)
            q_rows = rows(q_left if grouped else query, qs, qe)
            k_range = (grouped_key if grouped else key)[:, :, a:end]
            o, lse = attend(q_rows, k_range, value[:, :, a:end], mask, scaling)
            if empty is not None:  # rows with no allowed key in this range carry no weight
                lse = lse.masked_fill(empty, float("-inf"))
            parts.append((o, lse))
        out[:, :, qs:qe] = merge(parts).view(batch, hkv, rep, qe - qs, dim).reshape(batch, hq, qe - qs, dim).to(out.dtype)
    return out


def _contiguous(k_pos: torch.Tensor, key_valid: torch.Tensor | None) -> bool:
    """Valid keys sit at consecutive positions (position = slot − a per-row constant): distances are slot distances."""
    offset = k_pos - torch.arange(k_pos.shape[1], device=k_pos.device)
    if key_valid is None:
        return bool((offset == offset[:, -1:]).all())
    return bool(((offset == offset[:, -1:]) | ~key_valid).all())


def selfextend_attention_fused(
    query, key, value, q_pos, k_pos, inv_freq, group_size, window, scaling, *, key_valid=None, shift="int",
    scale_base=None, block_size=None, grouped_key=None,
) -> torch.Tensor:
    """Causal SelfExtend as one fused ``scaled_dot_product_attention`` call per query block.

    Both branches share one softmax by concatenating head dims: the query is ``[q_n, q_g]`` (2D), a key appears as
    ``[k_n, 0]`` (neighbour copy) or ``[0, k_g]`` (grouped copy), so each copy's score is exactly its branch's score.
    Per query block, keys ≥ W before the block's first query only need their grouped copy, keys within W of its
    last query only their neighbour copy; the band between gets both and a boolean mask picks one per pair (plus
    causality and padding). Needs positions contiguous per row (checked by the dispatcher), no softcap.
    """
    batch, hq, q_len, dim = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    if scale_base is not None and scale_base > 0:
        query = query * log_scale(q_pos, scale_base)[:, None, :, None].to(query.dtype)
    q_left, _, k_g = _grouped(query, key, q_pos, k_pos, inv_freq, group_size, window, shift, False, grouped_key)
    zeros = torch.zeros_like(key)
    q2 = torch.cat((query, q_left), -1)
    kn2, kg2 = torch.cat((key, zeros), -1), torch.cat((zeros, k_g), -1)
    v2 = torch.cat((value, torch.zeros_like(value)), -1)
    gqa = {"enable_gqa": True} if hq != hkv else {}
    offset = kv_len - q_len  # slot of query t is offset + t
    if block_size is None:
        # SDPA holds no score map. Smaller blocks waste less work on keys masked out for the block (each block scores
        # about `last query + block` keys with doubled head dims, while causal SDPA skips the upper triangle); 256-512
        # was fastest on CPU at 4k-16k tokens (SmolLM2 shapes)
        block_size = min(q_len, 512)
    out = torch.empty_like(query)
    device = query.device
    for qs in range(0, q_len, block_size):
        qe = min(q_len, qs + block_size)
        first, last = offset + qs, offset + qe - 1  # slots of the block's queries
        a_end = max(0, first - window + 1)  # keys < a_end: grouped for every query of the block
        c_start = max(a_end, last - window + 1)  # keys >= c_start: neighbour for every query of the block
        keys = torch.cat((kg2[:, :, :c_start], kn2[:, :, a_end : last + 1]), 2)
        vals = torch.cat((v2[:, :, :c_start], v2[:, :, a_end : last + 1]), 2)
        i = torch.arange(first, last + 1, device=device)[:, None]
        jg = torch.arange(0, c_start, device=device)[None]
        jn = torch.arange(a_end, last + 1, device=device)[None]
        mask = torch.cat(((i - jg >= window).expand(qe - qs, -1), (i - jn < window) & (jn <= i)), 1)[None]
        if key_valid is not None:
            mask = mask & torch.cat((key_valid[:, :c_start], key_valid[:, a_end : last + 1]), 1)[:, None]
        mask = mask[:, None]  # [B or 1, 1, bq, keys]
        out[:, :, qs:qe] = torch.nn.functional.scaled_dot_product_attention(
            q2[:, :, qs:qe], keys, vals, attn_mask=mask, scale=scaling, **gqa
        )[..., :dim]
    if key_valid is not None:  # queries that see no key (padding) are zeros, like the blocked path
        seen = key_valid[:, offset:][:, None, :, None]
        out = out.masked_fill(~seen, 0)
    return out


def selfextend_attention_blocked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    inv_freq: torch.Tensor,
    group_size: int,
    window: int,
    scaling: float,
    *,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,
    shift: str = "int",
    scale_base: float | None = None,
    softcap: float | None = None,
    block_size: int | None = None,
    contiguous: bool = False,
    grouped_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """SelfExtend attention computed in query blocks (any mask, causal or bidirectional, softcap);
    returns ``[B, Hq, q, Dv]`` in ``query.dtype``.

    Per block only ``block × kv`` scores exist (one map, neighbour/grouped selected per pair), so memory is O(n) for
    a fixed block; with ``causal`` the keys after the block's last query are skipped, and with ``contiguous``
    positions (distances = slot distances) the grouped scores are only computed for keys ≥ W before the block's
    last query and the neighbour scores only for keys within W of its first. GQA query heads are folded into the
    rows of one matmul per KV head (K/V never repeated). ``key_valid [B, kv]`` masks padding; rows with no valid key
    (padding queries) return zeros.
    """
    batch, hq, q_len, _ = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    rep = hq // hkv
    if scale_base is not None and scale_base > 0:
        query = query * log_scale(q_pos, scale_base)[:, None, :, None].to(query.dtype)
    q_left, q_right, k_g = _grouped(query, key, q_pos, k_pos, inv_freq, group_size, window, shift, not causal,
                                    grouped_key)

    def heads(x):  # [B, Hq, q, D] -> [B, Hkv, rep, q, D] fp32
        return x.float().reshape(batch, hkv, rep, q_len, x.shape[-1])

    def rows(x, qs, qe):  # block rows of every query head of a KV head: [B, Hkv, rep * bq, D]
        return x[:, :, :, qs:qe].reshape(batch, hkv, rep * (qe - qs), x.shape[-1])

    qn, qg = heads(query), heads(q_left)
    qr = heads(q_right) if q_right is not None else None
    kn, kg, vf = key.float(), k_g.float(), value.float()
    qp, kp = q_pos.to(torch.int64), k_pos.to(torch.int64)
    offset = kv_len - q_len

    if block_size is None:  # ~32M fp32 scores per block
        block_size = max(16, min(q_len, (1 << 25) // max(1, batch * hq * kv_len)))
    out = torch.empty(batch, hkv, rep, q_len, value.shape[-1], dtype=torch.float32, device=query.device)
    for qs in range(0, q_len, block_size):
        qe = min(q_len, qs + block_size)
        bq = qe - qs
        ke = min(kv_len, offset + qe) if causal else kv_len
        if causal and contiguous:
            n_start = min(ke, max(0, offset + qs - window + 1))  # keys before: grouped for the whole block
            g_end = max(n_start, min(ke, offset + qe - window))  # keys from here on: neighbours for the whole block
        else:
            n_start, g_end = 0, ke
        scores = torch.empty(batch, hkv, rep * bq, ke, dtype=torch.float32, device=query.device)
        if g_end > 0:
            scores[..., :g_end] = rows(qg, qs, qe) @ kg[:, :, :g_end].transpose(-1, -2)
        if ke > n_start:
            neighbour = rows(qn, qs, qe) @ kn[:, :, n_start:ke].transpose(-1, -2)
            band = slice(n_start, g_end)
            rel = qp[:, qs:qe, None] - kp[:, None, band]  # [B, bq, band]
            near = ((rel < window) if causal else (rel.abs() < window))[:, None, None]
            view = scores[..., band].view(batch, hkv, rep, bq, -1)
            nb = neighbour[..., : g_end - n_start].view(batch, hkv, rep, bq, -1)
            merged = torch.where(near, nb, view)
            if qr is not None:
                right = (rows(qr, qs, qe) @ kg[:, :, band].transpose(-1, -2)).view(batch, hkv, rep, bq, -1)
                merged = torch.where((rel < 0)[:, None, None] & ~near, right, merged)
            scores[..., band] = merged.reshape(batch, hkv, rep * bq, -1)
            scores[..., g_end:ke] = neighbour[..., g_end - n_start :]
        scores = scores.view(batch, hkv, rep, bq, ke) * scaling
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = _allowed(q_len, kv_len, qs, qe, 0, ke, causal, key_valid, query.device)
        if allowed is not None:
            probs = masked_softmax(scores, allowed[:, None, None])
        else:
            probs = torch.softmax(scores, dim=-1)
        out[:, :, :, qs:qe] = (probs.view(batch, hkv, rep * bq, ke) @ vf[:, :, :ke]).view(batch, hkv, rep, bq, -1)
    return out.reshape(batch, hq, q_len, -1).to(query.dtype)


def selfextend_attention_naive(
    query, key, value, q_pos, k_pos, inv_freq, group_size, window, scaling, *, causal=True, key_valid=None,
    shift="int", scale_base=None, softcap=None,
):
    """Two full q × kv score maps (neighbour and grouped) with K/V repeated per head: LongLM's formulation.
    Kept as the test oracle and as the "naive" line of the benchmark."""
    batch, hq, q_len, _ = query.shape
    rep = hq // key.shape[1]
    if scale_base is not None and scale_base > 0:
        query = query * log_scale(q_pos, scale_base)[:, None, :, None].to(query.dtype)
    q_left, q_right, k_g = _grouped(query, key, q_pos, k_pos, inv_freq, group_size, window, shift, not causal)
    rk = lambda x: x.float().repeat_interleave(rep, dim=1)  # noqa: E731
    kn, kg, v = rk(key), rk(k_g), rk(value)
    neighbour = query.float() @ kn.transpose(-1, -2)
    grouped = q_left.float() @ kg.transpose(-1, -2)
    rel = (q_pos[:, :, None] - k_pos[:, None, :])[:, None]
    near = (rel < window) if causal else (rel.abs() < window)
    scores = torch.where(near, neighbour, grouped)
    if q_right is not None:
        scores = torch.where((rel < 0) & ~near, q_right.float() @ kg.transpose(-1, -2), scores)
    scores = scores * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = _allowed(q_len, key.shape[2], 0, q_len, 0, key.shape[2], causal, key_valid, query.device)
    probs = masked_softmax(scores, allowed[:, None]) if allowed is not None else torch.softmax(scores, -1)
    return (probs @ v).to(query.dtype)
