"""V2PE (Ge et al. 2024): variable visual position increments, on transformers' own vision-language classes.

The position map is ``longctx.core.positions.v2pe_position_ids`` (text +1, image tokens +δ, ``ceil`` after a span).
This module is the integration, without replacing any forward:

* a forward pre-hook on the vision-language model computes the position ids from ``input_ids`` (the image token id
  from the model config) and the attention mask, per row, and passes them in; in ``generate()`` each new token
  continues from its row's last (possibly fractional) position, ``ceil(last) + 1``;
* positions stay exact (fp64) up to the rotary angle: a forward hook on each rotary module recomputes cos/sin from the
  fp64 positions with fp64 angles whenever they are fractional (transformers' rotary casts positions to fp32, whose
  spacing beyond 2^16 is already 1/128 — it would merge neighbouring image tokens at δ = 1/256). Integral positions
  (δ = 1, or text only) go to the model's own rotary as integers: bit-identical to the unpatched model.

``delta="auto"`` picks, per input, the largest δ in 1, 1/2, …, 1/256 for which every row fits the trained length.
V2PE's published gains come from fine-tuning with random δ; applying δ < 1 to a model not trained with it is an
experiment (the log line says so). M-RoPE models (Qwen2-VL family) are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from longctx.core.positions import V2PE_DELTAS, v2pe_auto_delta, v2pe_length, v2pe_position_ids
from longctx.models import find_rotary_modules, trained_length

from .base import Applied, MethodConfig, Undo, param
from .registry import Method, register
from .rope_common import guard_rotary

NAME = "v2pe"
DESCRIPTION = ("V2PE for vision-language models: image tokens advance the position by delta < 1 (text by 1); "
               "delta='auto' fits the input into the trained length. Untrained models: an experiment.")
SUPPORTED = "Llava, InternVL, Gemma3 and other transformers vision-language models whose language model uses 1-D RoPE"
logger = logging.getLogger("longctx")


@dataclass(frozen=True)
class V2PEConfig(MethodConfig):
    """V2PE. ``delta``: the position step of an image token, in (0, 1], or ``"auto"``; ``image_token_id``: default
    from the model config (``image_token_id`` / ``image_token_index``); ``trained_length``: for ``"auto"`` (default:
    the language model's)."""

    method: ClassVar[str] = NAME
    delta: float | str = param("auto", kind=float, gt=0, le=1, choices=("auto",), optional=False,
                               doc="the position step of an image token")
    image_token_id: int | None = param(kind=int, ge=0, doc="the image token (default: from the model config)")
    trained_length: int | None = param(kind=int, ge=2, doc="the length delta='auto' fits into")


class V2PEPositions:
    """Forward pre-hook on the vision-language model: V2PE's position ids per row, and in generation each new token
    after its row's last position. Plain data: deep-copies and pickles with the model."""

    def __init__(self, delta: float | str, image_token_id: int, trained: int) -> None:
        self.delta, self.image_token_id, self.trained = delta, image_token_id, trained
        self.last: torch.Tensor | None = None  # [B] fp64: each row's last position (generation continues from it)
        self.chosen: float | None = None  # the δ of the current input

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _positions(self, args, kwargs)


def _image_token_id(model: nn.Module, given: int | None) -> int:
    if given is not None:
        return int(given)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(model.config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model).__name__}'s config names no image token (image_token_id / image_token_index): "
                     "pass image_token_id=… (V2PE applies to vision-language models: " + SUPPORTED + ")")


def _check_model(model: nn.Module) -> Any:
    text_config = getattr(model.config, "text_config", None) or model.config
    rope = getattr(text_config, "rope_parameters", None) or {}
    mrope = "mrope_section" in rope or any(isinstance(v, dict) and "mrope_section" in v for v in rope.values())
    if mrope or "qwen2_vl" in model.config.model_type or "qwen2_5_vl" in model.config.model_type:
        raise ValueError(f"{type(model).__name__} uses M-RoPE (3-D positions); V2PE here supports {SUPPORTED}")
    if not find_rotary_modules(model):
        raise ValueError(f"{type(model).__name__} has no rotary position embeddings; V2PE supports {SUPPORTED}")
    return text_config


def _past_length(kwargs: dict) -> int:
    for name in ("cache", "past_key_values"):  # transformers renames past_key_values to cache
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def _positions(state: V2PEPositions, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """V2PE position ids for this forward (see :class:`V2PEPositions`)."""
    names = ("input_ids", "pixel_values", "attention_mask", "position_ids")
    named = {**dict(zip(names, args)), **kwargs}
    ids = named.get("input_ids")
    if ids is None:
        return args, kwargs
    mask = named.get("attention_mask")
    past = _past_length(named)
    image = ids == state.image_token_id
    if past == 0:
        if mask is None:
            mask = torch.ones_like(ids)
            named["attention_mask"] = mask
        delta = state.delta
        if delta == "auto":
            delta = v2pe_auto_delta(image, mask, state.trained)
            if delta != state.chosen:
                longest = int(v2pe_length(image, mask, delta).max())
                logger.info(f"longctx: v2pe delta='auto' chose delta = {delta:g} ({longest} positions for a "
                            f"trained length of {state.trained})")
        state.chosen = delta
        positions = v2pe_position_ids(span_mask=image, attention_mask=mask, delta=delta)
    else:
        if state.last is None or state.last.shape[0] != ids.shape[0]:
            raise RuntimeError("v2pe lost track of the generation (a cache it did not see being filled)")
        if bool(image.any()):
            raise NotImplementedError("v2pe continues a cached sequence with text tokens only; pass the image "
                                      "tokens in the first forward")
        start = torch.ceil(state.last) + 1
        positions = start[:, None] + torch.arange(ids.shape[1], device=ids.device, dtype=torch.float64)
    state.last = positions[:, -1].clone()
    if bool((positions == positions.round()).all()):
        positions = positions.long()  # integral: the model's own rotary, bit for bit
    named["position_ids"] = positions
    return (), named


def _exact_rotary_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """cos/sin from fp64 positions with fp64 angles (only for fractional positions, which arrive as fp64)."""
    x = kwargs.get("x", args[0] if args else None)
    position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
    if position_ids is None or position_ids.dtype != torch.float64:
        return output
    layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
    prefix = f"{layer_type}_" if layer_type else ""
    inv_freq = getattr(module, f"{prefix}inv_freq")
    scaling = getattr(module, f"{prefix}attention_scaling", getattr(module, "attention_scaling", 1.0))
    angles = position_ids.to(inv_freq.device)[..., None] * inv_freq.double()[None, None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def apply(model: nn.Module, cfg: V2PEConfig, undo: Undo) -> Applied:
    text_config = _check_model(model)
    token = _image_token_id(model, cfg.image_token_id)
    trained = int(cfg.trained_length) if cfg.trained_length else trained_length(text_config)
    hook = V2PEPositions(cfg.delta, token, trained)
    undo.hook(model.register_forward_pre_hook(hook, with_kwargs=True))
    for r in find_rotary_modules(model):
        guard_rotary(r.module, undo)
        undo.hook(r.module.register_forward_hook(_exact_rotary_hook, with_kwargs=True))
    shown = "auto" if cfg.delta == "auto" else f"{float(cfg.delta):g}"
    note = (f"image tokens advance positions by delta = {shown} (text by 1); a model not fine-tuned with V2PE's "
            "variable increments runs out of distribution: an experiment")
    logger.info(f"longctx: v2pe: {note}")
    delta = None if cfg.delta == "auto" else float(cfg.delta)
    return Applied(params={"delta": shown if delta is None else delta, "image_token_id": token,
                           "trained_length": trained},
                   trained_length=trained, target_length=None, factor=(1 / delta) if delta else None,
                   layer_types=None, notes=[note],
                   reload={"delta": cfg.delta, "image_token_id": token, "trained_length": trained})


METHOD = register(Method(NAME, "rope_positions", DESCRIPTION, V2PEConfig, apply, export_form="longctx",
                         examples=lambda L: [{"delta": 0.25}, {"delta": "auto"}]))

__all__ = ["V2PEConfig", "apply", "NAME", "DESCRIPTION", "V2PE_DELTAS", "METHOD"]
