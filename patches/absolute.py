"""Absolute-position encoders (BERT, MiniLM, E5 …): LongEmbed's training-free extensions of a learned position table.

No forward is replaced. A forward pre-hook on the embeddings module (whose ``forward`` takes ``position_ids``)
computes, per row, the position ids of its ``n`` real tokens (tokens other than ``pad_token_id``; left or right
padding) and passes them in; ``pi`` additionally swaps the position table for a longer interpolated one.
With ``L`` the trained length (table rows) and ``N`` the target length:

- ``grouped``: position ``p`` → ``p // g``, ``g = ceil(n / L)`` for the row's length ``n`` (so inputs ≤ L keep their
  positions exactly: ``g = 1``);
- ``recurrent``: ``p`` → ``p mod L`` (identity for inputs ≤ L);
- ``pi``: a table of ``s·L`` rows (``s = ceil(N / L)``) linearly interpolated between the learned rows, which stay
  as anchors at rows ``k·s`` (``"cubic"``: Catmull-Rom through the anchors); a row of length ``n`` reads rows
  ``p · max(1, floor(s·L / n))`` — inputs ≤ L hit the anchors, i.e. the original embeddings exactly (the E5-Base-4k
  convention), the longest inputs use every interpolated row.

- ``pcw``: chunk-and-average, no positions touched: an input longer than ``L`` is cut into chunks (see
  :func:`pcw_chunks`), encoded as a batch, and the chunk states are folded back so that mean or first-token pooling
  gives the mean of the chunk embeddings (LongEmbed normalises after averaging; sentence-transformers' Normalize
  does the same). This one replaces the encoder's ``forward`` on the instance (no hook can change what it returns
  per row); ``unpatch`` removes it.

``log_scale=True`` (grouped, recurrent, pi) also multiplies each row's queries by ``max(1, ln n / ln L)``, the
attention temperature of LongEmbed's runs, through an attention function registered with transformers'
``AttentionInterface`` (and ``AttentionMaskInterface``), sdpa underneath.

Models computing positions from ``input_ids`` with a padding offset (RoBERTa, XLM-R) get the offset added; their
table keeps its first ``padding_idx + 1`` rows in place.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from longctx.models import find_rotary_modules, position_offset
from .base import Applied, Undo, real_key_lengths

__all__ = ["GroupedConfig", "RecurrentConfig", "AbsolutePIConfig", "PCWConfig", "apply_grouped", "apply_recurrent",
           "apply_pi", "apply_pcw", "interpolate_table", "pcw_chunks"]

@dataclass
class _AbsoluteConfig:
    target_length: int | None = None
    factor: float | None = None
    trained_length: int | None = None
    log_scale: bool = False


@dataclass
class GroupedConfig(_AbsoluteConfig):
    """Grouped positions ``p // ceil(n / L)`` per input of ``n`` tokens. ``target_length`` (or ``factor``) sets
    the longest input the model is opened to; ``trained_length`` overrides the table size; ``log_scale`` multiplies
    queries by ``max(1, ln n / ln L)`` (LongEmbed's attention temperature)."""


@dataclass
class RecurrentConfig(_AbsoluteConfig):
    """Recurrent positions ``p mod L`` (``log_scale`` as for grouped)."""


@dataclass
class AbsolutePIConfig(_AbsoluteConfig):
    """Position interpolation of the learned table; ``mode``: ``"linear"`` or ``"cubic"`` (``log_scale`` as for
    grouped). ``table_interpolated=True``: the table already holds the ``s·L`` interpolated rows (a saved patched
    model being re-loaded by ``longctx.load``), only the row mapping is installed."""

    mode: str = "linear"
    table_interpolated: bool = False


@dataclass
class PCWConfig:
    """Chunk-and-average (LongEmbed's parallel context windows): inputs longer than ``L`` are cut into chunks of
    ``L − 2`` tokens (the last one overlapping), each encoded with the special tokens; ``chunk_batch_size`` chunks
    run at a time."""

    target_length: int | None = None
    factor: float | None = None
    trained_length: int | None = None
    chunk_batch_size: int = 32


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
        out = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
    anchors = torch.arange(L) * scale
    out[anchors] = src  # exact anchors whatever the rounding
    return out.to(table.dtype)


def _encoder(model: nn.Module) -> tuple[nn.Module, Any, nn.Module]:
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
        f"absolute-position methods (grouped, recurrent, pi, pcw) apply to BERT-style encoders — {hint}"
    )


def _lengths(config: Any, table_rows: int, cfg: Any) -> tuple[int, int, int]:
    """(offset, trained length L, target N)."""
    offset = position_offset(config)
    L = int(cfg.trained_length) if cfg.trained_length else table_rows - offset
    if cfg.target_length is not None and cfg.factor is not None:
        raise ValueError("give factor or target_length, not both")
    if cfg.target_length is not None:
        N = int(cfg.target_length)
    elif cfg.factor is not None:
        if cfg.factor < 1:
            raise ValueError(f"factor must be >= 1, got {cfg.factor}")
        N = int(round(L * cfg.factor))
    else:
        raise ValueError("give target_length (or factor): the longest input the encoder should read")
    if N <= L:
        raise ValueError(f"target_length={N} is not longer than the trained length {L}")
    return offset, L, N


def _install(model: nn.Module, cfg: Any, name: str, rows_for: Any, interpolate: bool, notes: list[str]) -> Applied:
    _, config, emb = _encoder(model)
    offset, L, N = _lengths(config, emb.position_embeddings.num_embeddings, cfg)
    undo = Undo()
    if cfg.log_scale:
        _install_log_scale(model, config, L, undo)
        notes = notes + [f"queries scaled by max(1, ln n / ln {L})"]
    scale = math.ceil(N / L) if interpolate else 1
    if getattr(cfg, "table_interpolated", False):
        if emb.position_embeddings.num_embeddings != offset + scale * L:
            raise ValueError(f"table_interpolated=True but the table has {emb.position_embeddings.num_embeddings} rows, "
                             f"not {offset + scale * L} (= ceil(target / trained) x trained + offset)")
    elif interpolate:
        new = interpolate_table(emb.position_embeddings.weight.data[offset:offset + L], scale, getattr(cfg, "mode", "linear"))
        weight = torch.cat((emb.position_embeddings.weight.data[:offset], new)) if offset else new
        new_table = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        new_table.weight.data.copy_(weight)
        new_table.weight.requires_grad_(emb.position_embeddings.weight.requires_grad)
        undo.setattr(emb, "position_embeddings", new_table)
        undo.setattr(config, "max_position_embeddings", weight.shape[0])
    rows = scale * L

    names = [p for p in inspect.signature(type(emb).forward).parameters][1:]  # positional order, self excluded

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        named = {**dict(zip(names, args)), **kwargs}  # DistilBERT passes position_ids positionally
        if named.get("position_ids") is not None:
            return None  # the caller chose positions
        ids, embeds = named.get("input_ids"), named.get("inputs_embeds", named.get("input_embeds"))
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        batch, n = ref.shape[0], ref.shape[1]
        pad = getattr(config, "pad_token_id", None)
        if ids is not None and pad is not None:  # real tokens: not padding (left or right)
            mask = (ids != pad).long()
        else:
            mask = torch.ones(batch, n, dtype=torch.long, device=ref.device)
        slot = (mask.cumsum(-1) - 1).clamp(min=0)  # index among the row's real tokens (left or right padding)
        lengths = mask.sum(-1, keepdim=True).clamp(min=1)
        positions = rows_for(slot, lengths, L, rows).clamp(max=rows - 1) + offset
        # padding keeps the position the model itself gives it: RoBERTa the padding index, BERT its slot
        if offset:
            pad_position = offset - 1
        else:
            every = torch.arange(n, device=ref.device)[None]
            pad_position = rows_for(every, torch.full_like(every[:, :1], n), L, rows).clamp(max=rows - 1)
        named["position_ids"] = positions * mask + pad_position * (1 - mask)
        return (), named

    # on the embeddings module: it is always called through __call__ (sentence-transformers calls the encoder's
    # forward directly, which skips hooks on the encoder itself)
    handle = emb.register_forward_pre_hook(hook, with_kwargs=True)
    undo.push(handle.remove)
    buffers = {b: getattr(emb, b) for b in ("token_type_ids",) if isinstance(getattr(emb, b, None), torch.Tensor)}
    for b, old in buffers.items():  # BERT gathers token types by position id: keep it as long as the table
        if old.shape[-1] < rows + offset:
            emb.register_buffer(b, torch.zeros(1, rows + offset, dtype=old.dtype, device=old.device), persistent=False)
            undo.push(lambda b=b, old=old: emb.register_buffer(b, old, persistent=False))
    params = {"trained_length": L, "target_length": N, **({"scale": scale} if interpolate else {})}
    extra = {"log_scale": True} if cfg.log_scale else {}
    if interpolate:
        extra.update(mode=cfg.mode, table_interpolated=True)
    return Applied(
        method=name, params={**params, **{k: v for k, v in extra.items() if k != "table_interpolated"}}, trained_length=L, target_length=N, factor=N / L, layer_types=None,
        revert=undo, notes=notes, reload={"trained_length": L, "target_length": N, **extra},
    )


# --- log-length attention temperature --------------------------------------------------------------------------

LOG_SCALE_ATTN = "longctx_log_scale"
_LOG_SCALE: dict[int, int] = {}  # id(config) -> trained length L of a model patched with log_scale=True


def log_scale_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: sdpa with each row's queries scaled by ``max(1, ln n / ln L)`` for its ``n``
    real tokens (LongEmbed's temperature for absolute-position encoders)."""
    L = _LOG_SCALE.get(id(module.config))
    if L is not None:
        n = real_key_lengths(attention_mask, query.shape[0], key.shape[2]).to(query.device)
        factor = (n.double().clamp(min=1).log() / math.log(L)).clamp(min=1.0)
        query = query * factor.to(query.dtype).view(-1, 1, 1, 1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _install_log_scale(model: nn.Module, config: Any, L: int, undo: Undo) -> None:
    if LOG_SCALE_ATTN not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(LOG_SCALE_ATTN, log_scale_attention_forward)
        AttentionMaskInterface.register(LOG_SCALE_ATTN, sdpa_mask)
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} does not select its attention through transformers' "
                         "AttentionInterface; log_scale needs it")
    base = config._attn_implementation
    _LOG_SCALE[id(config)] = L
    undo.push(lambda: _LOG_SCALE.pop(id(config), None))
    model.set_attn_implementation(LOG_SCALE_ATTN)
    undo.push(lambda: model.set_attn_implementation(base))


# --- chunk-and-average ---------------------------------------------------------------------------------------------


def pcw_chunks(tokens: torch.Tensor, L: int) -> list[torch.Tensor]:
    """LongEmbed's chunks of one input ``[first special] body [last special]`` of at most ``L`` tokens each:
    the body cut every ``L − 2`` tokens, the last chunk being the body's last ``L − 2`` tokens (overlapping its
    predecessor), each chunk wrapped in the input's own first and last token. Inputs of ``≤ L`` tokens: themselves."""
    if tokens.numel() <= L:
        return [tokens]
    first, body, last = tokens[:1], tokens[1:-1], tokens[-1:]
    size, pieces = L - 2, []
    for start in range(0, body.numel(), size):
        if start + size > body.numel():
            pieces.append(body[-size:])
            break
        pieces.append(body[start:start + size])
    return [torch.cat((first, piece, last)) for piece in pieces]


def _pcw_forward(original: Any, config: Any, L: int, chunk_batch: int) -> Any:
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    unsupported = ("inputs_embeds", "position_ids", "output_attentions", "output_hidden_states", "past_key_values")

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[1] <= L:
            return original(*args, **kwargs)
        used = [k for k in unsupported if kwargs.get(k) not in (None, False)]
        if used:
            raise NotImplementedError(f"pcw encodes chunks and averages them; {used} have no meaning for the whole "
                                      "input (pass input_ids and attention_mask)")
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows = [pcw_chunks(ids[b][mask[b].bool()], L) for b in range(ids.shape[0])]
        chunks = [c for row in rows for c in row]
        width = max(c.numel() for c in chunks)
        chunk_ids = torch.full((len(chunks), width), pad, dtype=ids.dtype, device=ids.device)
        chunk_mask = torch.zeros_like(chunk_ids)
        for i, c in enumerate(chunks):
            chunk_ids[i, : c.numel()] = c
            chunk_mask[i, : c.numel()] = 1
        hidden, pooled = [], []
        for i in range(0, len(chunks), chunk_batch):
            out = original(input_ids=chunk_ids[i:i + chunk_batch], attention_mask=chunk_mask[i:i + chunk_batch],
                           token_type_ids=torch.zeros_like(chunk_ids[i:i + chunk_batch]))
            hidden.append(out.last_hidden_state)
            pooled.append(getattr(out, "pooler_output", None))
        hidden = torch.cat(hidden)
        pooler = torch.cat(pooled) if pooled[0] is not None else None
        return _pcw_output(hidden, chunk_mask, pooler, rows, mask)

    return forward


def _pcw_output(hidden: torch.Tensor, chunk_mask: torch.Tensor, pooler: torch.Tensor | None, rows: list,
                mask: torch.Tensor) -> BaseModelOutputWithPooling:
    """Token states ``[B, n, d]`` whose mean over each row's real tokens is the mean of its chunks' mean-pooled
    states and whose first real token is the mean of its chunks' first-token states (so mean and CLS pooling give
    LongEmbed's chunk average); a row that is one chunk gets its own token states. The pooler output is the mean of
    the chunks' pooler outputs."""
    batch, n = mask.shape
    out = hidden.new_zeros(batch, n, hidden.shape[-1])
    pooled = None if pooler is None else pooler.new_zeros(batch, pooler.shape[-1])
    cm = chunk_mask.unsqueeze(-1).float()
    means = (hidden.float() * cm).sum(1) / cm.sum(1)
    start = 0
    for b, row in enumerate(rows):
        k = len(row)
        where = mask[b].bool().nonzero().squeeze(-1)
        if pooled is not None:
            pooled[b] = pooler[start:start + k].float().mean(0).to(pooled.dtype)
        if k == 1:
            out[b, where] = hidden[start, : where.numel()]
        else:
            first = hidden[start:start + k, 0].float().mean(0)
            mean = means[start:start + k].mean(0)
            real = where.numel()
            out[b, where] = ((real * mean - first) / (real - 1)).to(out.dtype)
            out[b, where[0]] = first.to(out.dtype)
        start += k
    return BaseModelOutputWithPooling(last_hidden_state=out, pooler_output=pooled)


def apply_grouped(model: nn.Module, cfg: GroupedConfig) -> Applied:
    def rows_for(slot, lengths, L, rows):
        return slot // ((lengths + L - 1) // L)

    return _install(model, cfg, "grouped", rows_for, False, [])


def apply_recurrent(model: nn.Module, cfg: RecurrentConfig) -> Applied:
    def rows_for(slot, lengths, L, rows):
        return slot % L

    return _install(model, cfg, "recurrent", rows_for, False, [])


def apply_pcw(model: nn.Module, cfg: PCWConfig) -> Applied:
    if cfg.chunk_batch_size < 1:
        raise ValueError(f"chunk_batch_size must be >= 1, got {cfg.chunk_batch_size}")
    owner, config, emb = _encoder(model)
    _, L, N = _lengths(config, emb.position_embeddings.num_embeddings, cfg)
    undo = Undo()
    owner.forward = _pcw_forward(type(owner).forward.__get__(owner), config, L, cfg.chunk_batch_size)
    undo.push(lambda: owner.__dict__.pop("forward", None))
    return Applied(
        method="pcw", params={"trained_length": L, "target_length": N, "chunk_batch_size": cfg.chunk_batch_size},
        trained_length=L, target_length=N, factor=N / L, layer_types=None, revert=undo,
        notes=[f"inputs over {L} tokens: chunks of {L - 2} + 2 special tokens, averaged"],
    )


def apply_pi(model: nn.Module, cfg: AbsolutePIConfig) -> Applied:
    def rows_for(slot, lengths, L, rows):
        return slot * (rows // lengths).clamp(min=1, max=rows // L)  # inputs <= L: the anchors, exactly

    return _install(model, cfg, "pi", rows_for, True, [f"position table interpolated ({cfg.mode})"])
