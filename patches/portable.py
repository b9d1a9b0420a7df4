"""What a patched model's config says to every runtime: both config layouts, as each reader reads them (floor 3).

transformers 5 reads ``rope_parameters``; transformers 4.x, vLLM, SGLang and the llama.cpp converter read the 4.x
layout, ``rope_scaling`` (with ``rope_type`` and the older ``type`` key) plus a top-level ``rope_theta`` and
``partial_rotary_factor`` (GPT-NeoX: ``rotary_emb_base`` and ``rotary_pct``, :data:`ALIASES`) — and transformers 5
itself prefers ``rope_scaling`` when a config.json holds both. So the two must agree, and both must be
written: :func:`write_legacy_layout` puts the 4.x layout into the patched config's ``__dict__`` beside
``rope_parameters`` (the class property ``rope_scaling`` still answers in memory; ``to_dict``, hence
``save_pretrained``, writes the entry), after reading it back with the model's own config class. A patched model's
``save_pretrained`` then writes what ``longctx export`` writes (the export starts from the same config).

How readers count ``max_position_embeddings`` differs by rope type and release (docs/export.md has the table and its
sources); the values a method sets are chosen so that every transformers release reads the same frequencies:

* ``linear`` / ``dynamic``: the trained length L (transformers' and vLLM's ``dynamic`` take L from it; vLLM serves
  L × factor);
* ``yarn``: L as well, with ``original_max_position_embeddings`` = L at the top level but **not** inside
  ``rope_scaling``: transformers ≤ 4.50 ignores that key and takes ``max_position_embeddings`` as the original
  length, and transformers 4.51–4.57 derives the factor from ``max_position_embeddings / original`` when the key is
  there (both silently wrong with the other choices); transformers 5 and vLLM 0.12–0.29 take the top-level key.
  The reading the newest vLLM wants instead (``max_position_embeddings`` = the target) is an export option
  (``config_for="vllm"``: :func:`write_reading`; :data:`READERS` says who reads which as meant);
* a plain θ change (``ntk``): the target.
"""

from __future__ import annotations

import copy
import math
from typing import Any

__all__ = ["NotStandard", "plain", "read_rope", "reads_back", "legacy_params", "legacy_layout", "layout_for",
           "write_legacy_layout", "portable_configs", "LEGACY_KEYS", "NO_LAYOUT", "CONFIG_FOR", "READERS",
           "reader_notes", "write_reading", "GGUFRope", "gguf_rope", "YARN_BETAS"]

LEGACY_KEYS = ("rope_scaling", "rope_theta")  # the 4.x layout (with partial_rotary_factor and ALIASES where they apply)


class NotStandard(Exception):
    """transformers cannot read these rope parameters from a config.json of this model type."""


def plain(rope: dict) -> dict:
    """Rope parameters without the legacy ``type`` alias (compared as transformers reads them)."""
    if any(isinstance(v, dict) for v in rope.values()):
        return {k: plain(v) if isinstance(v, dict) else v for k, v in rope.items()}
    return {k: v for k, v in rope.items() if k != "type"}


def read_rope(config: dict) -> dict:
    """``rope_parameters`` as this transformers reads them from a config.json holding ``config``
    (:class:`NotStandard` if its config class rejects them)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[config["model_type"]]
    data = {k: v for k, v in copy.deepcopy(config).items() if k not in ("model_type", "transformers_version")}
    try:
        return plain(cls(**data).rope_parameters)
    except Exception as e:  # noqa: BLE001 - any validation error means: not expressible for this config class
        raise NotStandard(f"{cls.__name__} rejects them: {str(e).strip().splitlines()[-1]}") from None


def reads_back(config: dict, rope: dict) -> bool:
    """Does a config.json holding ``config`` read back to the rope parameters ``rope``?"""
    try:
        return read_rope(config) == plain(rope)
    except NotStandard:
        return False


def legacy_params(rope: dict, layer_types: list[str] | None) -> dict | None:
    """The one set of parameters the 4.x layout can carry: the flat parameters, or those of the single extended
    layer type of a nested config (None where more than one layer type is extended)."""
    nested = [k for k, v in rope.items() if isinstance(v, dict)]
    if not nested:
        return dict(rope)
    extended = [k for k in (layer_types or nested) if k in rope]
    return dict(rope[extended[0]]) if len(extended) == 1 else None


# 4.x names of rope_theta / partial_rotary_factor in config classes that had their own (transformers 5 reads them
# only where rope_parameters lack the value; 4.x reads nothing else)
ALIASES = {
    "gpt_neox": {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"},
    "gpt_neox_japanese": {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"},
}


def legacy_layout(params: dict, model_type: str | None = None) -> dict:
    """The 4.x layout of one set of rope parameters: ``rope_scaling`` (``yarn``: without
    ``original_max_position_embeddings``, which the top level carries; see the module docstring), the top-level
    ``rope_theta`` and ``partial_rotary_factor``, and the model type's own 4.x names for them (:data:`ALIASES`)."""
    # "type": < 4.43; rope_theta / partial_rotary_factor go top level only (4.x warns on them inside rope_scaling)
    scaling = None if params["rope_type"] == "default" else {
        **{k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")},
        "type": params["rope_type"]}
    if params["rope_type"] == "yarn":
        scaling.pop("original_max_position_embeddings", None)
    layout = {"rope_scaling": scaling, "rope_theta": params["rope_theta"]}
    if "partial_rotary_factor" in params:
        layout["partial_rotary_factor"] = params["partial_rotary_factor"]
    for key, alias in ALIASES.get(model_type, {}).items():
        if key in layout:
            layout[alias] = layout[key]
    return layout


def layout_for(config: dict, rope: dict, layer_types: list[str] | None = None) -> dict | None:
    """The 4.x layout (``{"rope_scaling", "rope_theta"}``) of a config.json holding ``config`` whose rope parameters
    are ``rope``, or None where it cannot carry them: more than one extended layer type, or the config class does
    not read it back to ``rope`` (ModernBERT's applies ``rope_scaling`` to every layer type)."""
    legacy = legacy_params(rope, layer_types)
    if legacy is None:
        return None
    layout = legacy_layout(legacy, config.get("model_type"))
    data = {k: v for k, v in config.items() if k != "rope_parameters"}
    return layout if reads_back({**data, **layout}, rope) else None


NO_LAYOUT = ("no 4.x form (rope_scaling + top-level rope_theta) written: transformers does not read it back to "
             "these parameters for {}; only rope_parameters (transformers >= 5) carries them")


def write_legacy_layout(config: Any, layer_types: list[str] | None = None) -> list[str]:
    """Write the 4.x layout of ``config.rope_parameters`` into ``config.__dict__`` (saved by ``save_pretrained``)
    where :func:`layout_for` finds one; otherwise leave it out and say why (returned notes). ``config`` is a patched
    model's own copy (``privatize_configs``): unpatching puts the untouched one back."""
    layout = layout_for(config.to_dict(), copy.deepcopy(config.rope_parameters), layer_types)
    if layout is None:
        return [NO_LAYOUT.format(getattr(config, "model_type", "?"))]
    config.__dict__.update(layout)
    return []


def portable_configs(model: Any, layer_types: list[str] | None = None) -> list[str]:
    """:func:`write_legacy_layout` on every config a rotary module of ``model`` reads (a RoPE method's patch, after
    it is applied); returns the notes."""
    from longctx.models import find_rotary_modules

    configs = {id(r.config): r.config for r in find_rotary_modules(model)}
    return [note for config in configs.values() if getattr(config, "rope_parameters", None)
            for note in write_legacy_layout(config, layer_types)]


CONFIG_FOR = ("transformers", "vllm", "sglang")  # the readings an export chooses between where one config cannot
# serve every runtime


def write_reading(config: dict, rope_type: str, config_for: str, trained: int, target: int) -> None:
    """Turn a config.json written in the transformers reading (the patched config's) into ``config_for``'s, in place:

    * ``yarn`` for vLLM and SGLang: ``max_position_embeddings`` = the target, the trained length inside
      ``rope_scaling`` (vLLM ≤ 0.11 requires it there; SGLang on transformers 5 otherwise serves only the trained
      length); for SGLang also ``attn_factor`` = attention_factor / (0.1·ln s + 1) where the attention factor is not
      YaRN's default (SGLang's get_rope reads ``attn_factor`` / ``mscale`` / ``mscale_all_dim``, not
      ``attention_factor``; transformers warns about the key and ignores it);
    * ``longrope`` with an attention factor, for both: that factor also as ``short_mscale`` / ``long_mscale`` (what
      their get_rope reads; they ignore ``attention_factor``; transformers warns about the two keys and ignores them).

    Every other rope type has one reading."""
    if config_for not in CONFIG_FOR:
        raise ValueError(f"config_for must be one of {list(CONFIG_FOR)}, got {config_for!r}")
    if config_for == "transformers":
        return
    if rope_type == "yarn":
        config["max_position_embeddings"] = target
        if config.get("rope_scaling"):
            config["rope_scaling"]["original_max_position_embeddings"] = trained
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if not isinstance(rope, dict) or rope.get("attention_factor") is None:
            continue
        if rope_type == "longrope":  # vLLM / SGLang scale cos / sin by short_mscale / long_mscale
            rope["short_mscale"] = rope["long_mscale"] = rope["attention_factor"]
        elif rope_type == "yarn" and config_for == "sglang":
            s = float(rope.get("factor") or 1.0)
            default = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
            if abs(float(rope["attention_factor"]) - default) > 1e-9:
                rope["attn_factor"] = float(rope["attention_factor"]) / default


# Which runtimes read each rope type as longctx means it (docs/export.md has the table; the transformers side is
# measured by bench/export_compat.py, the vLLM side read from vLLM's get_rope / _get_and_verify_max_len / config
# patching, releases 0.6 … 0.33; the SGLang side from SGLang's rotary_embedding/factory.py get_rope and
# hf_transformers_utils.get_context_length, main of 2026-12; llama.cpp: gguf_rope below, and run).
READERS = {
    ("linear", "transformers"): "reads the same in transformers 4.45 … 5.x, vLLM 0.6 … 0.33 and SGLang (both serve "
                                "max_position_embeddings × factor)",
    ("default", "transformers"): "reads the same in transformers 4.45 … 5.x, vLLM 0.6 … 0.33 and SGLang (a plain "
                                 "rope_theta)",
    ("dynamic", "transformers"): "reads the same in transformers 4.45 … 5.x; vLLM ≤ 0.21 applies it statically at "
                                 "the full target (short inputs differ from transformers); vLLM 0.22 … 0.33 takes "
                                 "both its lengths from max_position_embeddings on Llama-family models and applies "
                                 "no scaling: do not serve it there (use yarn or pi)",
    ("longrope", "transformers"): "reads the same in transformers 4.46.3 and 5.25 (measured: bench/export_compat.py); "
                                  "vLLM (get_rope and Phi3LongRoPEScaledRotaryEmbedding, main of 2026-12, read "
                                  "from source) reads the factors and original_max_position_embeddings, scales cos "
                                  "/ sin by sqrt(1 + ln s / ln L) unless short_mscale / long_mscale are given, and "
                                  "uses the long factors at every position whenever --max-model-len exceeds the "
                                  "trained length (transformers: only for inputs longer than it)",
    ("longrope", "vllm"): "reads the same in vLLM (main of 2026-12, from source: short_mscale / long_mscale = the "
                          "attention factor) and in transformers 5.25, which warns about those two keys and ignores "
                          "them; vLLM uses the long factors at every position whenever --max-model-len exceeds the "
                          "trained length (transformers: only for inputs longer than it)",
    ("yarn", "transformers"): "reads the same in transformers 4.45 … 5.x and vLLM 0.12 … 0.29; vLLM ≤ 0.11 stops with "
                              "KeyError 'original_max_position_embeddings' and vLLM ≥ 0.30 serves only the trained "
                              "length: for those, export with config_for='vllm' (--config-for vllm); SGLang reads "
                              "it as meant on transformers 4.x but serves only the trained length on transformers 5 "
                              "(its rope_scaling then holds original_max_position_embeddings): config_for='sglang'",
    ("yarn", "sglang"): "reads the same in SGLang (on transformers 4.x and 5.x: the trained length inside "
                        "rope_scaling, max_position_embeddings = the target, attn_factor for a non-default attention "
                        "factor), vLLM 0.6 … 0.33 (which ignore attn_factor) and transformers 4.51 … 5.x (which warn "
                        "about attn_factor and ignore it); transformers ≤ 4.50 reads wrong frequencies: for those, "
                        "export with config_for='transformers' (the default)",
    ("longrope", "sglang"): "reads the same in SGLang and vLLM (short_mscale / long_mscale = the attention factor; "
                            "both read those, not attention_factor) and in transformers 5.25, which warns about the "
                            "two keys and ignores them",
    ("yarn", "vllm"): "reads the same in vLLM 0.6 … 0.33 and transformers 4.51 … 5.x; transformers ≤ 4.50 takes "
                      "max_position_embeddings as the trained length and reads wrong frequencies without an error: "
                      "for those, export with config_for='transformers' (the default)",
}


def reader_notes(kind: str, config_for: str, params: dict) -> list[str]:
    """The card's line on which runtimes read this config as longctx means it."""
    line = READERS.get((kind, config_for)) or READERS.get((kind, "transformers"))
    notes = [f"this config {line}"] if line else []
    if config_for != "transformers" and kind not in ("yarn", "longrope"):
        notes.append(f"config_for='{config_for}' changes nothing for this rope type: one config serves every runtime")
    if kind == "yarn" and config_for != "sglang" and (
            any(k in params for k in ("attention_factor", "mscale", "mscale_all_dim")) or params.get("truncate") is False):
        notes.append("vLLM ≤ 0.29 ignores attention_factor / mscale / mscale_all_dim (vLLM ≤ 0.11 also truncate) "
                     "and uses the default temperature 0.1·ln(factor) + 1")
    if kind == "longrope" and config_for == "transformers" and params.get("attention_factor") is not None:
        s, L = float(params.get("factor") or 1.0), params.get("original_max_position_embeddings")
        default = math.sqrt(1 + math.log(s) / math.log(L)) if L and s > 1 else 1.0
        if abs(float(params["attention_factor"]) - default) > 1e-9:
            notes.append(f"vLLM ignores attention_factor ({params['attention_factor']:.6g}) and scales by "
                         f"{default:.6g} unless short_mscale / long_mscale are set (SGLang likewise): for them, "
                         "export with config_for='vllm' / 'sglang' (--config-for), which writes them")
    if kind == "dynamic":
        notes.append("vLLM and SGLang apply dynamic NTK statically at the full target length (their rotary cache "
                     "is fixed); transformers recomputes it per sequence length, so short inputs differ between them")
    return notes


# --- llama.cpp (GGUF) -------------------------------------------------------------------------------------------
# What llama.cpp reads, from its source (llama.cpp as vendored by llama-cpp-python 0.3.36, commit 0c1e570 of
# 2026-10-01: src/llama-model.cpp load_hparams, src/llama-context.cpp, src/models/llama.cpp, ggml's rope_yarn):
#   {arch}.rope.freq_base                 θ
#   {arch}.rope.scaling.type              none | linear | yarn | longrope
#   {arch}.rope.scaling.factor            s: positions × 1/s (linear), YaRN's interpolation (yarn)
#   {arch}.rope.scaling.original_context_length   YaRN's L, and the longrope switch (long factors once n_ctx > L)
#   {arch}.rope.scaling.attn_factor       a multiplier of cos / sin: for yarn on top of 0.1·ln s + 1 (which llama.cpp
#                                         applies itself), otherwise the whole factor
#   rope_freqs.weight                     per-pair divisors of the frequencies (Llama 3.1's factors), any scaling type
#   rope_factors_long / _short.weight     longrope's two sets (llama arch: only with scaling type longrope)
# YaRN's β_fast / β_slow are not read from the file (32 and 1, or --yarn-beta-fast / --yarn-beta-slow at run time);
# a YaRN set with other betas is written as rope_freqs (its exact frequencies) with its attention factor.
# No dynamic scaling exists in llama.cpp.
YARN_BETAS = (32.0, 1.0)


class GGUFRope:
    """The rope metadata llama.cpp reads for one set of rope parameters: ``kv`` (keys without the ``{arch}.``
    prefix), ``tensors`` (name -> float32 values, one per rotary pair), ``scaling`` (the scaling type written) and
    ``notes`` (what the card says)."""

    def __init__(self, kv: dict, tensors: dict, scaling: str, notes: list[str]) -> None:
        self.kv, self.tensors, self.scaling, self.notes = kv, tensors, scaling, notes


def gguf_rope(params: dict, inv_freq: Any, attention: float, base_inv_freq: Any, trained: int) -> GGUFRope:
    """llama.cpp's reading of the rope parameters ``params`` (one layer type's, as transformers holds them).

    ``inv_freq`` / ``attention`` are transformers' own frequencies and cos / sin factor for them (its
    ``ROPE_INIT_FUNCTIONS``), ``base_inv_freq`` the plain θ frequencies; ``trained`` the trained length. Native
    keys where llama.cpp has the rope type (``default``, ``linear``, ``yarn`` with β 32 / 1 and truncation,
    ``longrope``); any other static per-pair frequency change (``llama3``, YaRN with other betas) as ``rope_freqs``
    (ratios of the frequencies) and its attention factor. Raises :class:`NotStandard` for what llama.cpp cannot run
    (``dynamic``: no dynamic scaling there).
    """
    import numpy as np

    kind = params.get("rope_type", "default")
    theta = float(params["rope_theta"])
    kv: dict[str, Any] = {"rope.freq_base": theta}
    tensors: dict[str, Any] = {}
    notes: list[str] = []
    if kind == "dynamic":
        raise NotStandard("llama.cpp has no dynamic NTK scaling (its rope is static): export 'ntk' (a static θ) or "
                          "'yarn' for llama.cpp")
    if kind == "default":
        return GGUFRope({**kv, "rope.scaling.type": "none"}, tensors, "none", notes)
    if kind == "linear":
        kv.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(params["factor"])})
        return GGUFRope(kv, tensors, "linear", notes)
    factor = float(params.get("factor") or 1.0)
    original = int(params.get("original_max_position_embeddings") or trained)
    if kind == "longrope":
        kv.update({"rope.scaling.type": "longrope", "rope.scaling.original_context_length": original,
                   "rope.scaling.attn_factor": float(attention)})
        tensors["rope_factors_long"] = np.asarray(params["long_factor"], dtype=np.float32)
        tensors["rope_factors_short"] = np.asarray(params["short_factor"], dtype=np.float32)
        notes.append(f"llama.cpp uses the long factors whenever its context (-c / n_ctx) exceeds {original} "
                     f"tokens, for every input (transformers: only for inputs longer than {original})")
        return GGUFRope(kv, tensors, "longrope", notes)
    betas = (float(params.get("beta_fast") or YARN_BETAS[0]), float(params.get("beta_slow") or YARN_BETAS[1]))
    if kind == "yarn" and betas == YARN_BETAS and params.get("truncate", True) is not False and factor > 1:
        kv.update({"rope.scaling.type": "yarn", "rope.scaling.factor": factor,
                   "rope.scaling.original_context_length": original,
                   # llama.cpp multiplies cos / sin by 0.1·ln s + 1 itself; attn_factor carries the rest
                   "rope.scaling.attn_factor": float(attention) / (0.1 * math.log(factor) + 1.0)})
        return GGUFRope(kv, tensors, "yarn", notes)
    ratios = (np.asarray(base_inv_freq, dtype=np.float64) / np.asarray(inv_freq, dtype=np.float64)).astype(np.float32)
    kv.update({"rope.scaling.type": "none", "rope.scaling.attn_factor": float(attention)})
    tensors["rope_freqs"] = ratios
    notes.append(f"'{kind}' written as per-pair frequency divisors (rope_freqs) and its attention factor "
                 f"{float(attention):.6g}: llama.cpp reads the exact frequencies transformers computes")
    return GGUFRope(kv, tensors, "none", notes)
