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

from longctx.patches.portable import (CONFIG_FOR, LEGACY_KEYS, NO_LAYOUT, READERS, NotStandard, layout_for,
                                      legacy_params, plain, reader_notes, reads_back, write_reading)

from .files import SKIP_DIRS

__all__ = ["standard_config", "standard_params", "NotStandard", "raised_limits", "CONFIG_FOR", "READERS"]


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
    write_reading(config, kind, config_for, L, target)
    if not reads_back(config, rope):
        raise NotStandard(f"{base.get('model_type')}'s config class does not read {plain(rope)} back")
    notes += reader_notes(kind, config_for, main)
    keys = ("rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings",
            "original_max_position_embeddings")
    return config, {k: config[k] for k in keys if k in config}, notes


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
