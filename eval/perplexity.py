"""Perplexity versus length on local long text: token-weighted NLL over windows of a given length.

``stride=None`` scores non-overlapping windows (every token once, with the context of its own window);
``stride=s`` slides windows of ``length`` by ``s`` tokens and scores only the last ``s`` tokens of each (after the
first), the usual sliding-window evaluation. ``split_at`` additionally reports the NLL of the tokens at positions
≥ ``split_at`` inside their window (e.g. the trained length: how the model does *past* its window).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .progress import progress as show
from .runner import Cell, sweep

__all__ = ["PerplexityResult", "perplexity", "token_ids"]


@dataclass
class PerplexityResult:
    length: int
    windows: int
    tokens: int
    nll: float
    ppl: float
    stride: int | None = None
    split_at: int | None = None
    tokens_past_split: int = 0
    ppl_past_split: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one row of token ids (no truncation, no special tokens but the tokenizer's BOS)."""
    ids = tokenizer(text, return_tensors="pt", truncation=False, add_special_tokens=True).input_ids
    return ids[0]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    length: int,
    *,
    stride: int | None = None,
    max_windows: int | None = None,
    split_at: int | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` on ``ids`` (1-D) in windows of ``length`` tokens."""
    ids = ids.reshape(-1)
    if ids.numel() < length:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {length}")
    if stride is not None and not 0 < stride <= length:
        raise ValueError(f"stride must be in 1..{length}, got {stride}")
    step = stride or length
    starts = list(range(0, ids.numel() - length + 1, step))
    if max_windows is not None:
        starts = starts[:max_windows]
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    past_nll, past_tokens = 0.0, 0
    for i, start in enumerate(show(starts, desc=desc or f"ppl@{length}", enabled=progress)):
        window = ids[start : start + length].to(device)[None]
        logits = model(input_ids=window).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="none")  # nll[j] scores token j+1
        first_scored = 0 if (stride is None or i == 0) else length - stride - 1
        scored = nll[first_scored:]
        total_nll += scored.sum().item()
        total_tokens += scored.numel()
        if split_at is not None and split_at < length:
            past = nll[max(first_scored, split_at - 1) :]
            past_nll += past.sum().item()
            past_tokens += past.numel()
    mean = total_nll / total_tokens
    return PerplexityResult(
        length=length,
        windows=len(starts),
        tokens=total_tokens,
        nll=mean,
        ppl=math.exp(mean),
        stride=stride,
        split_at=split_at,
        tokens_past_split=past_tokens,
        ppl_past_split=math.exp(past_nll / past_tokens) if past_tokens else None,
    )


def ppl_table(
    model: torch.nn.Module,
    ids: torch.Tensor,
    methods: list[str],
    lengths: list[int],
    *,
    trained_length: int | None = None,
    max_windows: int | None = None,
    method_params: dict[str, dict[str, Any]] | None = None,
    stride: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity for every (method, length): each method is applied with ``target_length`` = the eval length
    (``"vanilla"`` = unpatched; at lengths within the trained window only vanilla is run). Rows are tidy dicts (one
    :func:`~longctx.eval.runner.sweep`); the model is left as it was found."""
    import longctx

    trained = trained_length or longctx.inspect(model).trained_length

    def run(cell: Cell) -> list[dict[str, Any]]:
        result = perplexity(model, ids, cell.length, stride=stride, max_windows=max_windows,
                            split_at=trained if cell.length > trained else None, progress=progress,
                            desc=f"{cell.method}@{cell.length}")
        return [{"trained_length": trained, "factor": cell.length / trained, **result.to_dict()}]

    return sweep(model, methods, lengths, run, target="each", method_params=method_params, skip_within=trained,
                 trained_length=trained_length)
