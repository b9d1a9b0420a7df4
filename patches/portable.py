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
           "reader_notes", "write_reading"]

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


CONFIG_FOR = ("transformers", "vllm")  # the readings an export chooses between where one config cannot serve both


def write_reading(config: dict, rope_type: str, config_for: str, trained: int, target: int) -> None:
    """Turn a config.json written in the transformers reading (the patched config's) into ``config_for``'s, in place:
    for ``yarn``, vLLM's (``max_position_embeddings`` = the target, the trained length inside ``rope_scaling`` as
    vLLM ≤ 0.11 requires); for ``longrope`` with an attention factor, that factor also as ``short_mscale`` /
    ``long_mscale`` (what vLLM's get_rope reads; it ignores ``attention_factor``, and transformers warns about the two
    keys and ignores them). Every other rope type has one reading."""
    if config_for not in CONFIG_FOR:
        raise ValueError(f"config_for must be one of {list(CONFIG_FOR)}, got {config_for!r}")
    if config_for == "vllm" and rope_type == "yarn":
        config["max_position_embeddings"] = target
        if config.get("rope_scaling"):
            config["rope_scaling"]["original_max_position_embeddings"] = trained
    if config_for == "vllm" and rope_type == "longrope":  # vLLM scales cos / sin by short_mscale / long_mscale
        for key in ("rope_parameters", "rope_scaling"):
            rope = config.get(key)
            if isinstance(rope, dict) and rope.get("attention_factor") is not None:
                rope["short_mscale"] = rope["long_mscale"] = rope["attention_factor"]


# Which runtimes read each rope type as longctx means it (docs/export.md has the table; the transformers side is
# measured by bench/export_compat.py, the vLLM side read from vLLM's get_rope / _get_and_verify_max_len / config
# patching, releases 0.6 … 0.33).
READERS = {
    ("linear", "transformers"): "reads the same in transformers 4.45 … 5.x and vLLM 0.6 … 0.33 (serves "
                                "max_position_embeddings × factor)",
    ("default", "transformers"): "reads the same in transformers 4.45 … 5.x and vLLM 0.6 … 0.33 (a plain rope_theta)",
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
                              "length: for those, export with config_for='vllm' (--config-for vllm)",
    ("yarn", "vllm"): "reads the same in vLLM 0.6 … 0.33 and transformers 4.51 … 5.x; transformers ≤ 4.50 takes "
                      "max_position_embeddings as the trained length and reads wrong frequencies without an error: "
                      "for those, export with config_for='transformers' (the default)",
}


def reader_notes(kind: str, config_for: str, params: dict) -> list[str]:
    """The card's line on which runtimes read this config as longctx means it."""
    line = READERS.get((kind, config_for)) or READERS.get((kind, "transformers"))
    notes = [f"this config {line}"] if line else []
    if config_for == "vllm" and kind not in ("yarn", "longrope"):
        notes.append("config_for='vllm' changes nothing for this rope type: one config serves every runtime")
    if kind == "yarn" and (any(k in params for k in ("attention_factor", "mscale", "mscale_all_dim"))
                           or params.get("truncate") is False):
        notes.append("vLLM ≤ 0.29 ignores attention_factor / mscale / mscale_all_dim (vLLM ≤ 0.11 also truncate) "
                     "and uses the default temperature 0.1·ln(factor) + 1")
    if kind == "longrope" and config_for != "vllm" and params.get("attention_factor") is not None:
        s, L = float(params.get("factor") or 1.0), params.get("original_max_position_embeddings")
        default = math.sqrt(1 + math.log(s) / math.log(L)) if L and s > 1 else 1.0
        if abs(float(params["attention_factor"]) - default) > 1e-9:
            notes.append(f"vLLM ignores attention_factor ({params['attention_factor']:.6g}) and scales by "
                         f"{default:.6g} unless short_mscale / long_mscale are set: for vLLM, export with "
                         "config_for='vllm' (--config-for vllm), which writes them")
    if kind == "dynamic":
        notes.append("vLLM and SGLang apply dynamic NTK statically at the full target length (their rotary cache "
                     "is fixed); transformers recomputes it per sequence length, so short inputs differ between them")
    return notes
