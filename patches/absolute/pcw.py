"""Chunk-and-average (LongEmbed's parallel context windows): no positions touched.

An input longer than ``L`` is cut into chunks (see :func:`pcw_chunks`), encoded as a batch, and the chunk states are
folded back so that mean or first-token pooling gives the mean of the chunk embeddings (LongEmbed normalises after
averaging; sentence-transformers' Normalize does the same). This is the one method that replaces a forward: no hook
can change what the encoder returns per row, so the encoder instance gets a ``forward`` attribute (a
:class:`PCWForward`, plain data that copies and pickles with the model) that ``unpatch`` removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..base import Applied, LengthConfig, Undo, param
from ..registry import Method, register
from .common import encoder_parts, lengths

NAME = "pcw"
DESCRIPTION = ("chunk-and-average (LongEmbed's parallel context windows): chunks of L - 2 tokens + specials, the last "
               "overlapping, chunk embeddings averaged; exact for n <= L")
UNSUPPORTED = ("inputs_embeds", "position_ids", "output_attentions", "output_hidden_states", "past_key_values", "cache")


@dataclass(frozen=True)
class PCWConfig(LengthConfig):
    """Chunk-and-average: inputs longer than ``L`` are cut into chunks of ``L − 2`` tokens (the last one
    overlapping), each encoded with the special tokens; ``chunk_batch_size`` chunks run at a time."""

    method: ClassVar[str] = NAME
    chunk_batch_size: int = param(32, kind=int, ge=1, optional=False, doc="chunks encoded at a time")


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


class PCWForward:
    """The encoder's ``forward`` while patched: inputs of at most ``L`` tokens go to the class's own forward; longer
    ones are chunked, encoded and averaged."""

    def __init__(self, owner: nn.Module, L: int, chunk_batch: int, pad: int) -> None:
        self.owner, self.L, self.chunk_batch, self.pad = owner, L, chunk_batch, pad

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.owner).forward(self.owner, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[1] <= self.L:
            return self.original(*args, **kwargs)
        used = [k for k in UNSUPPORTED if kwargs.get(k) not in (None, False)]
        if used:
            raise NotImplementedError(f"pcw encodes chunks and averages them; {used} have no meaning for the whole "
                                      "input (pass input_ids and attention_mask)")
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows = [pcw_chunks(ids[b][mask[b].bool()], self.L) for b in range(ids.shape[0])]
        chunks = [c for row in rows for c in row]
        width = max(c.numel() for c in chunks)
        chunk_ids = torch.full((len(chunks), width), self.pad, dtype=ids.dtype, device=ids.device)
        chunk_mask = torch.zeros_like(chunk_ids)
        for i, c in enumerate(chunks):
            chunk_ids[i, : c.numel()] = c
            chunk_mask[i, : c.numel()] = 1
        hidden, pooled = [], []
        for i in range(0, len(chunks), self.chunk_batch):
            part = slice(i, i + self.chunk_batch)
            out = self.original(input_ids=chunk_ids[part], attention_mask=chunk_mask[part],
                                token_type_ids=torch.zeros_like(chunk_ids[part]))
            hidden.append(out.last_hidden_state)
            pooled.append(getattr(out, "pooler_output", None))
        pooler = torch.cat(pooled) if pooled[0] is not None else None
        return _pcw_output(torch.cat(hidden), chunk_mask, pooler, rows, mask)


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


def apply(model: nn.Module, cfg: PCWConfig, undo: Undo) -> Applied:
    owner, config, emb = encoder_parts(model, NAME)
    _, L, N = lengths(config, emb.position_embeddings.num_embeddings, cfg)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    undo.setattr(owner, "forward", PCWForward(owner, L, cfg.chunk_batch_size, pad))
    return Applied(
        params={"trained_length": L, "target_length": N, "chunk_batch_size": cfg.chunk_batch_size},
        trained_length=L, target_length=N, factor=N / L, layer_types=None,
        notes=[f"inputs over {L} tokens: chunks of {L - 2} + 2 special tokens, averaged"],
    )


METHOD = register(Method(NAME, "absolute", DESCRIPTION, PCWConfig, apply, export_form="longctx", bounded=False,
                         compare_by_default=True, unchanged_within=True,
                         aliases=("chunk", "chunking")))
