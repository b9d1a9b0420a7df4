"""CLEX (Chen et al., ICLR 2024): continuous length-extrapolation scaling, on transformers' own model classes.

The math is ``longctx.core.clex``; this module is the integration:

* the frequencies of every scale ``t = 1 … max_factor`` are computed once at patch time — integrated from learned
  ODE weights (``ode_weights``: a CLEX checkpoint directory or weights file, tensors named
  ``…clex_layer.proj_func.ode_up_proj`` / ``ode_down_proj``), or, without them, the training-free limit in closed
  form: NTK scaling with ``α = 2t − 1`` (the ODE with zero dynamics; logged);
* the config keeps the model's own ``rope_parameters`` (a saved copy loads as the base model in plain transformers;
  its ``longctx`` block re-applies CLEX in ``longctx.load``), and a forward pre-hook on each rotary module sets the
  row of ``t = ceil(n / L)`` (n = largest position + 1, capped at ``max_factor``) for the current forward;
* an attention runtime (``patches/attention.py``, wrapping the model's own sdpa / eager / flash attention) keeps the KV
  cache consistent — when ``t`` steps up during generation, the cached keys are re-rotated once, in place, from the
  old frequencies to the new ones (``R(p·f_new) k = R(p·(f_new − f_old)) · R(p·f_old) k``); the reference re-rotates
  every cached key at every step — and applies ``log_scale``: queries multiplied by ``log(kv_len) / log(L)`` for each
  row's real keys (unclamped: below 1 for inputs shorter than L), on every backend. The reference does this only on
  its flash-attention path; released CLEX configs set ``log_scale: true``.

``t`` is one per forward (the longest row of a batch), as in the reference, which assumes batch 1: rows of a
left-padded batch equal their own runs when they fall in the same ``t``.

Released checkpoints (config.json ``rope_scaling`` of type ``clex``, an ``auto_map`` to remote code, ODE weights in
the weights) are recognised here and loaded on transformers' own class for their model type.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from longctx.core.clex import (
    ACTIVATIONS,
    ODE_KEYS,
    clex_inv_freq_table,
    clex_scale,
    clex_training_free_table,
    log_scale_factor,
    read_ode_weights,
)
from longctx.core.rope import default_inv_freq, rotate_by_angles
from longctx.models import layer_params

from .attention import AttentionRuntime, CachedPositions, attention_modules, install_attention
from .base import Applied, LengthConfig, Undo, param, real_key_lengths
from .registry import Method, register
from .rope_common import FrequencyHook, frequency_buffer, own_frequencies, layer_type_of, rope_targets

NAME = "clex"
DESCRIPTION = (
    "CLEX: frequencies from a learned ODE in the scale t = ceil(n/L) (released CLEX checkpoints: ode_weights); "
    "without learned weights its training-free limit, NTK with alpha = 2t - 1."
)
FAMILIES = ("llama", "mistral", "mixtral", "phi", "qwen2")  # model types of CLEX checkpoints mapped onto transformers
logger = logging.getLogger("longctx")


@dataclass(frozen=True)
class CLEXConfig(LengthConfig):
    """CLEX. ``max_factor``: largest scale t (default: ``ceil(target / trained)``; or give ``factor`` /
    ``target_length``); ``ode_weights``: a CLEX checkpoint directory or a ``.safetensors`` / ``.bin`` file holding
    ``…clex_layer.proj_func.ode_up_proj`` / ``ode_down_proj`` (None: the training-free limit); ``param_factor``,
    ``act``, ``time_dt``: the ODE's width factor, activation (``tanh`` / ``silu``) and RK4 step, as in the checkpoint's
    ``rope_scaling``; ``log_scale``: multiply queries by ``log(kv_len) / log(L)`` (the reference's flash path)."""

    method: ClassVar[str] = NAME
    max_factor: int | None = param(kind=int, ge=1, doc="the largest scale t = ceil(n / L)")
    ode_weights: str | None = param(kind=str, doc="a CLEX checkpoint directory or weights file")
    param_factor: int = param(1, kind=int, ge=1, optional=False, doc="the ODE's width factor")
    act: str = param("tanh", kind=str, choices=tuple(sorted(ACTIVATIONS)), optional=False, doc="the ODE's activation")
    time_dt: float = param(0.01, kind=float, gt=0, le=1, optional=False, doc="the RK4 step")
    log_scale: bool = param(False, kind=bool, optional=False, doc="queries x log(kv_len) / log(L)")


class CLEXRuntime(AttentionRuntime):
    """The scale of the current forward, the frequency tables, and the KV cache's re-rotation."""

    transient: ClassVar[tuple[str, ...]] = (*AttentionRuntime.transient, "cached")

    def __init__(self, trained: int, max_factor: int, log_scale: bool, tables: dict[int, dict[Any, torch.Tensor]]):
        self.trained, self.max_factor, self.log_scale = trained, max_factor, log_scale
        self.tables = tables  # config id at patch time -> layer type (None: flat) -> [max_factor, rot/2] fp32
        self.t = 1
        self.__dict__.update(self.fresh_transient())

    def fresh_transient(self) -> dict[str, Any]:
        return {**super().fresh_transient(), "cached": CachedPositions(NAME)}

    def table(self, module: nn.Module) -> torch.Tensor | None:
        layer_type = layer_type_of(module)
        for tables in self.tables.values():
            if layer_type in tables:
                return tables[layer_type]
        return None

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        table = self.table(module)
        if table is not None:
            self._sync_cache(module, key, query.shape[2], kwargs.get("position_ids"), table)
            if self.log_scale:
                # each row's tokens so far (its real keys under a full cache; a sliding-window cache holds fewer)
                position_ids = kwargs.get("position_ids")
                if position_ids is not None and getattr(module, "is_causal", True):  # decoders (left padding)
                    n = (position_ids[:, -1].to(query.device) + 1).expand(query.shape[0])
                else:
                    n = real_key_lengths(attention_mask, query.shape[0], key.shape[2]).to(query.device)
                query = query * log_scale_factor(n, self.trained).to(query.dtype).view(-1, 1, 1, 1)
        return self.call_base(module, query, key, value, attention_mask, **kwargs)

    def _sync_cache(self, module, key, q_len, position_ids, table) -> None:
        """When the scale changed since this layer's cached keys were rotated, re-rotate them once, in place."""
        if getattr(module, "layer_idx", None) is None:  # an encoder's attention: no cache
            return
        cache, _ = self.cache_layer(module, key)
        past, state = self.cached.update(cache, position_ids, key.shape[0], q_len, key.shape[2], key.device)
        old_t = state.get("t", self.t)
        if past is not None and old_t != self.t:
            table = table.to(key.device)
            delta = past[..., None] * (table[self.t - 1] - table[old_t - 1])[None, None]  # [B, past, rot/2]
            n = past.shape[1]
            key[:, :, :n] = rotate_by_angles(key[:, :, :n], delta[:, None]).to(key.dtype)
        state["t"] = self.t


class CLEXFrequencies(FrequencyHook):
    """Rotary pre-hook: the scale t of this forward (on the runtime) and its row of the frequency table."""

    def __init__(self, runtime: CLEXRuntime, tables: dict[Any, torch.Tensor]) -> None:
        self.runtime, self.tables = runtime, tables
        self.layer_types = list(tables)

    def on_length(self, n: int) -> None:
        self.runtime.t = clex_scale(n, self.runtime.trained, self.runtime.max_factor)

    def frequencies(self, layer_type: str | None, n: int) -> torch.Tensor:
        return self.tables[layer_type][self.runtime.t - 1]


def apply(model: nn.Module, cfg: CLEXConfig, undo: Undo) -> Applied:
    lengths = cfg
    if cfg.max_factor is not None and cfg.factor is None and cfg.target_length is None:
        lengths = dataclasses.replace(cfg, factor=float(cfg.max_factor))
    weights = read_ode_weights(cfg.ode_weights) if cfg.ode_weights else None  # fails before touching the model
    targets = rope_targets(model, NAME, lengths)
    ctx = targets.first
    max_factor = int(cfg.max_factor) if cfg.max_factor is not None else int(math.ceil(ctx.factor - 1e-9))
    tables: dict[int, dict[Any, torch.Tensor]] = {}
    for cid, config in targets.configs.items():
        tables[cid] = {}
        rotary = next(r.module for r in targets.rotaries if r.config is config)
        for c in targets.contexts[cid]:
            theta = layer_params(config, c.layer_type)["rope_theta"]
            if weights is None:
                table = clex_training_free_table(c.rotary_dim, theta, max_factor)
            else:
                base = default_inv_freq(c.rotary_dim, theta)
                table = clex_inv_freq_table(base, *weights, cfg.act, max_factor, cfg.time_dt)
            own = frequency_buffer(rotary, c.layer_type)
            if own.dtype == torch.float32 and own.shape == table[0].shape and own.device.type != "meta":
                # t = 1 is the model's own RoPE: its very frequencies (not a recomputation a ulp apart)
                table[0] = own.detach().cpu()
            tables[cid][c.layer_type] = table
        config.max_position_embeddings = max(targets.contexts[cid][0].target_length, config.max_position_embeddings or 0)
    runtime = CLEXRuntime(ctx.trained_length, max_factor, cfg.log_scale, tables)
    for r in targets.rotaries:
        own_frequencies(r.module, undo)
        undo.hook(r.module.register_forward_pre_hook(CLEXFrequencies(runtime, tables[id(r.config)]),
                                                     with_kwargs=True))
    name = install_attention(model, runtime, undo, attention_modules(model, targets.configs.values()), NAME)
    source = (f"learned ODE weights from {cfg.ode_weights}" if weights is not None else
              "no learned weights: the training-free limit, NTK scaling with alpha = 2t - 1")
    logger.info(f"longctx: clex with {source}; t = ceil(n / {ctx.trained_length}) up to {max_factor}")
    notes = [f"clex: {source}", f"attention '{name}': cached keys re-rotated once when t steps up"
             + (f"; queries scaled by log(kv_len) / log({ctx.trained_length})" if cfg.log_scale else "")]
    params = {k: v for k, v in cfg.to_dict().items() if v is not None}
    params.update(factor=ctx.factor, target_length=ctx.target_length, trained_length=ctx.trained_length,
                  max_factor=max_factor)
    if weights is None:
        params["training_free"] = True
    reload = {k: v for k, v in params.items() if k != "training_free"}
    return Applied(params=params, trained_length=ctx.trained_length, target_length=ctx.target_length,
                   factor=ctx.factor, layer_types=targets.layer_types(), notes=notes, reload=reload)


# ---------------------------------------------------------------------------------------------------------------
# released checkpoints
# ---------------------------------------------------------------------------------------------------------------
def recognise(raw: dict) -> bool:
    """A config.json of a CLEX checkpoint as released: ``rope_scaling`` of type ``clex``."""
    scaling = raw.get("rope_scaling") or {}
    return isinstance(scaling, dict) and (scaling.get("type") or scaling.get("rope_type")) == "clex"


def load_checkpoint(folder: Path, *, dtype: Any = None, device: str | None = None,
                    allow_training_free: bool = False, **_: Any) -> tuple[Any, dict[str, Any]]:
    """A CLEX checkpoint as released (CLEX-LLaMA-2, CLEX-Phi-2, CLEX-Mixtral: config.json with ``rope_scaling``
    ``{"type": "clex", "max_factor", "param_factor", "act", "time_dt"}``, ``log_scale``, an ``auto_map`` to remote
    code, weights holding ``model.clex_layer.proj_func.ode_up_proj`` / ``ode_down_proj``) on transformers' own class
    for its model type — no ``trust_remote_code`` — and the ``clex`` parameters to patch it with.
    ``allow_training_free``: weights without the ODE parameters load with CLEX's training-free limit."""
    import transformers

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    scaling = raw["rope_scaling"]
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"CLEX checkpoint of model type '{model_type}': longctx maps CLEX checkpoints of "
                         f"{', '.join(FAMILIES)} onto transformers' own classes")
    try:
        read_ode_weights(folder)
        ode_weights: str | None = str(folder)
    except FileNotFoundError:
        if not allow_training_free:
            raise FileNotFoundError(
                f"{folder} is a CLEX checkpoint (rope_scaling type 'clex') but its weights hold no ODE parameters "
                "(model.clex_layer.proj_func.ode_up_proj / ode_down_proj); pass allow_training_free=True to load it "
                "with CLEX's training-free limit (NTK with alpha = 2t - 1)"
            ) from None
        ode_weights = None
    drop = ("model_type", "rope_scaling", "auto_map", "architectures", "log_scale", "use_flashattn",
            "transformers_version")
    config = transformers.CONFIG_MAPPING[model_type](**{k: v for k, v in raw.items() if k not in drop})
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype or torch.float32)
    model = model.eval()
    if device:
        model = model.to(device)
    params = {k: scaling[k] for k in ("max_factor", "param_factor", "act", "time_dt") if k in scaling}
    params.update(ode_weights=ode_weights, log_scale=bool(raw.get("log_scale", True)))  # CLEXLlamaConfig's default
    logger.warning(f"longctx: loaded the CLEX checkpoint {folder} as {type(model).__name__} without remote code "
                   f"({'learned ODE weights' if ode_weights else 'training-free limit: no ODE weights'}, max_factor "
                   f"{params.get('max_factor')}, log_scale {params['log_scale']})")
    return model, params


def write_ode_weights(source: str, directory: Any) -> str:
    """An export's copy of the learned ODE weights (``clex_ode.safetensors``); returns how the record names it."""
    from safetensors.torch import save_file

    tensors = dict(zip((f"model.{k}" for k in ODE_KEYS), read_ode_weights(source)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(directory) / "clex_ode.safetensors"))
    return "./clex_ode.safetensors"


def _legacy(params: dict) -> tuple[dict, dict]:
    """Saves of longctx < 0.2 wrote rope_type 'longctx_clex' (their longctx block holds the parameters)."""
    base = {k: v for k, v in params.items() if k not in ("factor", "original_max_position_embeddings")}
    return {**base, "rope_type": "default"}, {}


METHOD = register(Method(NAME, "rope", DESCRIPTION, CLEXConfig, apply, export_form="longctx", recognise=recognise,
                         load_checkpoint=load_checkpoint, legacy_rope_types={"longctx_clex": _legacy},
                         carry_files={"ode_weights": write_ode_weights},
                         examples=lambda L: [{"max_factor": 4}, {"max_factor": 4, "log_scale": True}]))
