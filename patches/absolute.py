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

Models computing positions from ``input_ids`` with a padding offset (RoBERTa, XLM-R) get the offset added; their
table keeps its first ``padding_idx + 1`` rows in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import Applied, Undo

__all__ = ["GroupedConfig", "RecurrentConfig", "AbsolutePIConfig", "apply_grouped", "apply_recurrent", "apply_pi",
           "interpolate_table"]

_OFFSET_MODELS = ("roberta", "xlm-roberta", "camembert", "xlm_roberta")


@dataclass
class GroupedConfig:
    """Grouped positions ``p // ceil(n / L)`` per input of ``n`` tokens. ``target_length`` (or ``factor``) sets
    the longest input the model is opened to; ``trained_length`` overrides the table size."""

    target_length: int | None = None
    factor: float | None = None
    trained_length: int | None = None


@dataclass
class RecurrentConfig:
    """Recurrent positions ``p mod L``."""

    target_length: int | None = None
    factor: float | None = None
    trained_length: int | None = None


@dataclass
class AbsolutePIConfig:
    """Position interpolation of the learned table; ``mode``: ``"linear"`` or ``"cubic"``."""

    target_length: int | None = None
    factor: float | None = None
    trained_length: int | None = None
    mode: str = "linear"


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


def _encoder(model: nn.Module) -> tuple[Any, nn.Module]:
    """(the encoder's config, its embeddings module with a learned position table)."""
    candidates = [model] + [m for _, m in model.named_children()]
    for m in candidates:
        emb = getattr(m, "embeddings", None)
        table = getattr(emb, "position_embeddings", None)
        if isinstance(table, nn.Embedding):
            return m.config, emb
    raise ValueError(
        f"{type(model).__name__} has no learned absolute position table (embeddings.position_embeddings); the "
        "absolute-position methods (grouped, recurrent, pi) apply to BERT-style encoders"
    )


def _lengths(config: Any, table_rows: int, cfg: Any) -> tuple[int, int, int]:
    """(offset, trained length L, target N)."""
    model_type = getattr(config, "model_type", "")
    offset = (config.pad_token_id + 1) if model_type in _OFFSET_MODELS else 0
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
    config, emb = _encoder(model)
    offset, L, N = _lengths(config, emb.position_embeddings.num_embeddings, cfg)
    undo = Undo()
    scale = 1
    if interpolate:
        scale = math.ceil(N / L)
        new = interpolate_table(emb.position_embeddings.weight.data[offset:offset + L], scale, getattr(cfg, "mode", "linear"))
        weight = torch.cat((emb.position_embeddings.weight.data[:offset], new)) if offset else new
        new_table = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        new_table.weight.data.copy_(weight)
        new_table.weight.requires_grad_(emb.position_embeddings.weight.requires_grad)
        undo.setattr(emb, "position_embeddings", new_table)
        undo.setattr(config, "max_position_embeddings", weight.shape[0])
    rows = scale * L

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("position_ids") is not None:
            return None  # the caller chose positions
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
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
        kwargs["position_ids"] = positions * mask + offset * (1 - mask)
        return args, kwargs

    # on the embeddings module: it is always called through __call__ (sentence-transformers calls the encoder's
    # forward directly, which skips hooks on the encoder itself)
    handle = emb.register_forward_pre_hook(hook, with_kwargs=True)
    undo.push(handle.remove)
    buffers = {b: getattr(emb, b) for b in ("token_type_ids",) if isinstance(getattr(emb, b, None), torch.Tensor)}
    for b, old in buffers.items():  # BERT gathers token types by position id: keep it as long as the table
        if old.shape[-1] < rows + offset:
            emb.register_buffer(b, torch.zeros(1, rows + offset, dtype=old.dtype, device=old.device), persistent=False)
            undo.push(lambda b=b, old=old: emb.register_buffer(b, old, persistent=False))
    return Applied(
        method=name, params={"trained_length": L, "target_length": N, **({"scale": scale} if name == "pi" else {})},
        trained_length=L, target_length=N, factor=N / L, layer_types=None, revert=undo, notes=notes,
    )


def apply_grouped(model: nn.Module, cfg: GroupedConfig) -> Applied:
    def rows_for(slot, lengths, L, rows):
        return slot // ((lengths + L - 1) // L)

    return _install(model, cfg, "grouped", rows_for, False, [])


def apply_recurrent(model: nn.Module, cfg: RecurrentConfig) -> Applied:
    def rows_for(slot, lengths, L, rows):
        return slot % L

    return _install(model, cfg, "recurrent", rows_for, False, [])


def apply_pi(model: nn.Module, cfg: AbsolutePIConfig) -> Applied:
    def rows_for(slot, lengths, L, rows):
        return slot * (rows // lengths).clamp(min=1, max=rows // L)  # inputs <= L: the anchors, exactly

    return _install(model, cfg, "pi", rows_for, True, [f"position table interpolated ({cfg.mode})"])
