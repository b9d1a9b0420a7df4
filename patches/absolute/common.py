"""What the absolute-position methods share: the encoder's position table, lengths, the position-ids pre-hook, the
table interpolation, and LongEmbed's ``log_scale`` attention temperature.

No forward is replaced (``pcw`` excepted, see ``pcw.py``). A forward pre-hook on the embeddings module (whose
``forward`` takes ``position_ids``) computes, per row, the position ids of its ``n`` real tokens (tokens other than
``pad_token_id``; left or right padding) by the method's rule and passes them in. Models computing positions from
``input_ids`` with a padding offset (RoBERTa, XLM-R) get the offset added; their table keeps its first
``padding_idx + 1`` rows in place.

``log_scale=True`` multiplies each row's queries by ``max(1, ln n / ln L)``, the attention temperature of LongEmbed's
runs, through the shared attention machinery (``patches/attention.py``) wrapping the model's own attention.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from longctx.models import find_rotary_modules, position_offset

from ..attention import AttentionRuntime, attention_modules, install_attention
from ..base import Applied, LengthConfig, Undo, follow_casts, param, real_key_lengths

__all__ = ["AbsoluteConfig", "encoder_parts", "lengths", "interpolate_table", "install_positions", "RULES",
           "PositionsHook", "LogScaleRuntime"]


@dataclass(frozen=True)
class AbsoluteConfig(LengthConfig):
    """Lengths (``target_length`` or ``factor``: the longest input the encoder should read; ``trained_length``
    overrides the table size) and ``log_scale``: queries × ``max(1, ln n / ln L)`` (LongEmbed's temperature)."""

    method: ClassVar[str] = "absolute"
    log_scale: bool = param(False, kind=bool, optional=False, doc="queries x max(1, ln n / ln L) (LongEmbed)")


def encoder_parts(model: nn.Module, method: str) -> tuple[nn.Module, Any, nn.Module]:
    """(the encoder module, its config, its embeddings module with a learned position table)."""
    candidates = [model] + [m for _, m in model.named_children()]
    for m in candidates:
        emb = getattr(m, "embeddings", None)
        table = getattr(emb, "position_embeddings", None)
        if isinstance(table, nn.Embedding):
            return m, m.config, emb
    hint = ("it has rotary embeddings: use a RoPE method (pi, ntk, dynamic_ntk, yarn, selfextend)"
            if find_rotary_modules(model) else "it has neither a position table nor rotary embeddings, so no "
            "longctx method applies")
    raise ValueError(
        f"{type(model).__name__} has no learned absolute position table (embeddings.position_embeddings); the "
        f"absolute-position method '{method}' applies to BERT-style encoders — {hint}"
    )


def lengths(config: Any, table_rows: int, cfg: LengthConfig) -> tuple[int, int, int]:
    """(offset, trained length L, target N)."""
    offset = position_offset(config)
    L = int(cfg.trained_length) if cfg.trained_length else table_rows - offset
    if cfg.target_length is not None and cfg.factor is not None:
        raise ValueError(f"{cfg.method}: give factor or target_length, not both")
    if cfg.target_length is not None:
        N = int(cfg.target_length)
    elif cfg.factor is not None:
        N = int(round(L * cfg.factor))
    else:
        raise ValueError(f"{cfg.method}: give target_length (or factor): the longest input the encoder should read")
    if N <= L:
        raise ValueError(f"{cfg.method}: target_length={N} is not longer than the trained length {L}")
    return offset, L, N


def interpolate_table(table: torch.Tensor, scale: int, mode: str = "linear") -> torch.Tensor:
    """``[L, d]`` → ``[scale·L, d]`` (fp32 math): row ``k·scale`` is row ``k`` exactly; rows between are
    interpolated (linear, or Catmull-Rom cubic through the anchors); rows past the last anchor repeat it."""
    if mode not in ("linear", "cubic"):
        raise ValueError(f"mode must be 'linear' or 'cubic', got {mode!r}")
    L = table.shape[0]
    src = table.float()
    x = torch.arange(scale * L, dtype=torch.float64) / scale
    x = x.clamp(max=L - 1)
    k = x.floor().long().clamp(max=L - 2) if L > 1 else x.floor().long()
    t = (x - k).float()[:, None]
    if L == 1:
        return src.expand(scale, -1).to(table.dtype).clone()
    p1, p2 = src[k], src[k + 1]
    if mode == "linear":
        out = p1 + (p2 - p1) * t
    else:
        p0, p3 = src[(k - 1).clamp(min=0)], src[(k + 2).clamp(max=L - 1)]
        out = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                     + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
    anchors = torch.arange(L) * scale
    out[anchors] = src  # exact anchors whatever the rounding
    return out.to(table.dtype)


# --- position rules: (slot among the row's real tokens, row length n, L, table rows) -> row of the table ----------
def _grouped(slot: torch.Tensor, n: torch.Tensor, L: int, rows: int) -> torch.Tensor:
    return slot // ((n + L - 1) // L)


def _recurrent(slot: torch.Tensor, n: torch.Tensor, L: int, rows: int) -> torch.Tensor:
    return slot % L


def _pi(slot: torch.Tensor, n: torch.Tensor, L: int, rows: int) -> torch.Tensor:
    return slot * (rows // n).clamp(min=1, max=rows // L)  # inputs <= L: the anchors, exactly


RULES = {"grouped": _grouped, "recurrent": _recurrent, "pi": _pi}


class PositionsHook:
    """Forward pre-hook on the embeddings module: per-row position ids from the rule (plain data: copies and
    pickles with the model)."""

    def __init__(self, names: list[str], rule: str, L: int, rows: int, offset: int, pad: int | None) -> None:
        self.names, self.rule, self.L, self.rows, self.offset, self.pad = names, rule, L, rows, offset, pad

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        named = {**dict(zip(self.names, args)), **kwargs}  # DistilBERT passes position_ids positionally
        if named.get("position_ids") is not None:
            return None  # the caller chose positions
        ids, embeds = named.get("input_ids"), named.get("inputs_embeds", named.get("input_embeds"))
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        rows_for = RULES[self.rule]
        batch, n = ref.shape[0], ref.shape[1]
        if ids is not None and self.pad is not None:  # real tokens: not padding (left or right)
            mask = (ids != self.pad).long()
        else:
            mask = torch.ones(batch, n, dtype=torch.long, device=ref.device)
        slot = (mask.cumsum(-1) - 1).clamp(min=0)  # index among the row's real tokens (left or right padding)
        real = mask.sum(-1, keepdim=True).clamp(min=1)
        positions = rows_for(slot, real, self.L, self.rows).clamp(max=self.rows - 1) + self.offset
        # padding keeps the position the model itself gives it: RoBERTa the padding index, BERT its slot
        if self.offset:
            pad_position = self.offset - 1
        else:
            every = torch.arange(n, device=ref.device)[None]
            pad_position = rows_for(every, torch.full_like(every[:, :1], n), self.L, self.rows).clamp(
                max=self.rows - 1)
        named["position_ids"] = positions * mask + pad_position * (1 - mask)
        return (), named


class LogScaleRuntime(AttentionRuntime):
    """Each row's queries × ``max(1, ln n / ln L)`` for its ``n`` real tokens, then the model's own attention."""

    def __init__(self, trained: int) -> None:
        self.trained = trained

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        n = real_key_lengths(attention_mask, query.shape[0], key.shape[2]).to(query.device)
        factor = (n.double().clamp(min=1).log() / math.log(self.trained)).clamp(min=1.0)
        query = query * factor.to(query.dtype).view(-1, 1, 1, 1)
        return self.call_base(module, query, key, value, attention_mask, **kwargs)


def install_positions(model: nn.Module, cfg: AbsoluteConfig, undo: Undo, rule: str, interpolate: bool,
                      notes: list[str]) -> Applied:
    """The shared apply of ``grouped`` / ``recurrent`` / ``pi_absolute``: optionally a longer interpolated table,
    the positions pre-hook with ``rule``, and ``log_scale``."""
    _, config, emb = encoder_parts(model, cfg.method)
    offset, L, N = lengths(config, emb.position_embeddings.num_embeddings, cfg)
    scale = math.ceil(N / L) if interpolate else 1
    table_interpolated = getattr(cfg, "table_interpolated", False)
    if table_interpolated and emb.position_embeddings.num_embeddings != offset + scale * L:
        raise ValueError(f"{cfg.method}: table_interpolated=True but the table has "
                         f"{emb.position_embeddings.num_embeddings} rows, not {offset + scale * L} "
                         "(= ceil(target / trained) x trained + offset)")
    if cfg.log_scale:
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(f"{type(model).__name__} does not select its attention through transformers' "
                             "AttentionInterface; log_scale needs it")
        install_attention(model, LogScaleRuntime(L), undo, attention_modules(model, [config]), cfg.method)
        notes = notes + [f"queries scaled by max(1, ln n / ln {L})"]
    aside = follow_casts(emb, undo)  # the table and buffers set aside follow .to() while patched
    if interpolate and not table_interpolated:
        old = emb.position_embeddings
        new = interpolate_table(old.weight.data[offset:offset + L], scale, getattr(cfg, "mode", "linear"))
        weight = torch.cat((old.weight.data[:offset], new)) if offset else new
        table = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        table.weight.data.copy_(weight)
        table.weight.requires_grad_(old.weight.requires_grad)
        aside.replace_module("position_embeddings", table)
        config.max_position_embeddings = weight.shape[0]
    rows = scale * L
    names = [p for p in inspect.signature(type(emb).forward).parameters][1:]  # positional order, self excluded
    hook = PositionsHook(names, rule, L, rows, offset, getattr(config, "pad_token_id", None))
    # on the embeddings module: it is always called through __call__ (sentence-transformers calls the encoder's
    # forward directly, which skips hooks on the encoder itself)
    undo.hook(emb.register_forward_pre_hook(hook, with_kwargs=True))
    for name in ("token_type_ids",):  # BERT gathers token types by position id: keep it as long as the table
        old_buf = getattr(emb, name, None)
        if isinstance(old_buf, torch.Tensor) and old_buf.shape[-1] < rows + offset:
            aside.replace_buffer(name, torch.zeros(1, rows + offset, dtype=old_buf.dtype, device=old_buf.device))
    params = {"trained_length": L, "target_length": N, **({"scale": scale} if interpolate else {})}
    extra: dict[str, Any] = {"log_scale": True} if cfg.log_scale else {}
    if interpolate:
        extra.update(mode=cfg.mode, table_interpolated=True)
    return Applied(params={**params, **{k: v for k, v in extra.items() if k != "table_interpolated"}},
                   trained_length=L, target_length=N, factor=N / L, layer_types=None, notes=notes,
                   reload={"trained_length": L, "target_length": N, **extra})
