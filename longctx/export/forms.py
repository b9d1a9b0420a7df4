"""The standard config form: the patched model's config as every runtime reads it, in both layouts, read back.

A patched model's config is already the portable form (``longctx.patches.portable``): transformers' own rope types
in ``rope_parameters``, ``max_position_embeddings`` / ``original_max_position_embeddings`` set so that every
transformers release reads the same frequencies, and the 4.x layout (``rope_scaling`` + top-level ``rope_theta``)
that transformers 4.x, vLLM, SGLang and the llama.cpp converter read. The export writes that onto the base
config.json, reads it back with the model's own config class (a layout that does not reproduce the parameters is
left out, e.g. ModernBERT's, whose 4.x config applies ``rope_scaling`` to every layer type), and where one config
cannot serve every reader (``yarn``: transformers ≤ 4.50 against vLLM ≥ 0.30) writes the reading ``config_for``
names. :data:`READERS` is the card's line on who reads the result as longctx means it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from longctx.patches.portable import LEGACY_KEYS, NO_LAYOUT, NotStandard, layout_for, legacy_params, plain, reads_back

from .files import SKIP_DIRS

__all__ = ["standard_config", "standard_params", "NotStandard", "raised_limits", "CONFIG_FOR", "READERS"]


CONFIG_FOR = ("transformers", "vllm")  # the readings config_for= chooses between, where one config cannot serve both


def standard_params(params: dict) -> dict:
    """One layer type's rope parameters as written to disk (the in-memory ones: standard types only)."""
    return dict(params)


def standard_config(base: dict, patched: Any, info: Any, config_for: str = "transformers"
                    ) -> tuple[dict, dict, list[str]]:
    """``base`` config.json with the patched model's config as it is in memory: ``(config, keys set, notes)``.

    ``patched`` is the patched model's config object: its ``rope_parameters``, ``max_position_embeddings``, a
    top-level ``original_max_position_embeddings`` and the 4.x layout (``rope_scaling`` + ``rope_theta``) that
    ``longctx.patches.portable`` put beside them — exactly what its ``save_pretrained`` writes. ``config_for``:
    ``"transformers"`` (every transformers release 4.45 … 5.x reads it the same) or ``"vllm"`` (for ``yarn``, the
    reading vLLM ≥ 0.30 serves at the target; transformers ≤ 4.50 reads that one wrongly: see :data:`READERS`).
    Raises :class:`NotStandard` when the model's config class cannot read the parameters back at all (e.g. Phi-3
    accepts only 'default' and 'longrope').
    """
    if config_for not in CONFIG_FOR:
        raise ValueError(f"config_for must be one of {list(CONFIG_FOR)}, got {config_for!r}")
    L, target = int(info.trained_length), int(info.target_length)
    rope = copy.deepcopy(patched.rope_parameters)
    nested = any(isinstance(v, dict) for v in rope.values())
    rope = ({k: (standard_params(v) if isinstance(v, dict) else v) for k, v in rope.items()} if nested
            else standard_params(rope))
    config = copy.deepcopy(base)
    config.pop("longctx", None)
    config["rope_parameters"] = rope
    config["max_position_embeddings"] = patched.max_position_embeddings
    if "original_max_position_embeddings" in config or "original_max_position_embeddings" in vars(patched):
        config["original_max_position_embeddings"] = L  # Phi-3 style, and yarn's (portable.py)
    notes: list[str] = []
    for key in LEGACY_KEYS:  # the base's 4.x layout is replaced, or kept where none can be written
        config.pop(key, None)
    layout = layout_for(config, rope, info.layer_types)
    if layout is not None:
        config.update(layout)
    else:
        config.update({k: base[k] for k in LEGACY_KEYS if k in base})
        notes.append(NO_LAYOUT.format(base.get("model_type")))
    legacy = legacy_params(rope, info.layer_types)
    extended = [k for k in (info.layer_types or []) if isinstance(rope.get(k), dict)]
    main = legacy if legacy is not None else (rope[extended[0]] if extended else
                                              next(v for v in rope.values() if isinstance(v, dict)))
    kind = main["rope_type"]
    if config_for == "vllm" and kind == "yarn":
        config["max_position_embeddings"] = target
        if config.get("rope_scaling"):
            config["rope_scaling"]["original_max_position_embeddings"] = L
    if not reads_back(config, rope):
        raise NotStandard(f"{base.get('model_type')}'s config class does not read {plain(rope)} back")
    notes += reader_notes(kind, config_for, main)
    keys = ("rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings",
            "original_max_position_embeddings")
    return config, {k: config[k] for k in keys if k in config}, notes


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
    if config_for == "vllm" and kind != "yarn":
        notes.append("config_for='vllm' changes nothing for this rope type: one config serves every runtime")
    if kind == "yarn" and (any(k in params for k in ("attention_factor", "mscale", "mscale_all_dim"))
                           or params.get("truncate") is False):
        notes.append("vLLM ≤ 0.29 ignores attention_factor / mscale / mscale_all_dim (vLLM ≤ 0.11 also truncate) "
                     "and uses the default temperature 0.1·ln(factor) + 1")
    if kind == "dynamic":
        notes.append("vLLM and SGLang apply dynamic NTK statically at the full target length (their rotary cache "
                     "is fixed); transformers recomputes it per sequence length, so short inputs differ between them")
    return notes


def raised_limits(folder: Path, target: int) -> dict[Path, dict]:
    """Tokenizer ``model_max_length`` and sentence-transformers ``max_seq_length`` files raised to ``target``."""
    rewrites = {}
    for path in folder.rglob("*.json"):
        if SKIP_DIRS & set(path.relative_to(folder).parts):
            continue
        key = {"tokenizer_config.json": "model_max_length", "sentence_bert_config.json": "max_seq_length"}.get(path.name)
        if key is None:
            continue
        data = json.loads(path.read_text())
        if isinstance(data.get(key), (int, float)) and data[key] < target:
            data[key] = target
            rewrites[path.relative_to(folder)] = data
    return rewrites
