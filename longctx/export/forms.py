"""The standard config form: rope parameters every runtime reads, in both config layouts, read back before use.

A patched model's config holds only transformers' own rope types (``longctx.patches`` writes no other), so the
export writes them as they are: the transformers 5 ``rope_parameters`` *and* the 4.x form (``rope_scaling`` +
top-level ``rope_theta``) that vLLM, SGLang and the llama.cpp converter read, with ``max_position_embeddings`` set
the way those consumers count the served length (vLLM: ``max_position_embeddings × factor`` for linear / dynamic,
``original_max_position_embeddings × factor`` for yarn, ``max_position_embeddings`` for a plain θ change). Both forms
are read back with the model's own config class; a form that does not reproduce the parameters is not written
(e.g. ModernBERT, whose 4.x config applies ``rope_scaling`` to every layer type).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .files import SKIP_DIRS

__all__ = ["standard_config", "standard_params", "NotStandard", "raised_limits"]


class NotStandard(Exception):
    """transformers cannot read these rope parameters from a config.json of this model type."""


def standard_params(params: dict) -> dict:
    """One layer type's rope parameters as written to disk (the in-memory ones: standard types only)."""
    return dict(params)


def standard_config(base: dict, patched: Any, info: Any) -> tuple[dict, dict, list[str]]:
    """``base`` config.json with the patched rope parameters in both forms: ``(config, keys set, notes)``.

    ``patched`` is the patched model's config object (its ``rope_parameters``), ``info`` the patch record. Raises
    :class:`NotStandard` when the model's config class cannot read them back at all (e.g. Phi-3 accepts only
    'default' and 'longrope').
    """
    L, target = int(info.trained_length), int(info.target_length)
    rope = copy.deepcopy(patched.rope_parameters)
    nested = [k for k, v in rope.items() if isinstance(v, dict)]
    if nested:
        rope = {k: (standard_params(v) if isinstance(v, dict) else v) for k, v in rope.items()}
        extended = [k for k in (info.layer_types or nested) if k in rope]
        legacy = dict(rope[extended[0]]) if len(extended) == 1 else None
        main = rope[extended[0]]
    else:
        rope = standard_params(rope)
        legacy = dict(rope)
        main = rope
    config = copy.deepcopy(base)
    config.pop("longctx", None)
    config["rope_parameters"] = rope
    # the served length as each consumer counts it (see the module docstring)
    config["max_position_embeddings"] = L if main["rope_type"] in ("linear", "dynamic") else target
    if "original_max_position_embeddings" in config:  # Phi-3 style: transformers prefers it over rope_parameters
        config["original_max_position_embeddings"] = L
    notes: list[str] = []
    if legacy is not None:
        if legacy["rope_type"] == "default":
            config["rope_scaling"] = None
        else:
            config["rope_scaling"] = {**legacy, "type": legacy["rope_type"]}  # "type": readers before 4.43
        config["rope_theta"] = legacy["rope_theta"]
    if legacy is None or not _reads_back({k: v for k, v in config.items() if k != "rope_parameters"}, rope):
        for key in ("rope_scaling", "rope_theta"):
            if key in base:
                config[key] = base[key]
            else:
                config.pop(key, None)
        notes.append("no 4.x form (rope_scaling + top-level rope_theta) written: transformers does not read it back "
                     f"to these parameters for {base.get('model_type')}; only rope_parameters (transformers >= 5) "
                     "carries them")
    if not _reads_back(config, rope):
        raise NotStandard(f"{base.get('model_type')}'s config class does not read {_plain(rope)} back")
    if main["rope_type"] == "dynamic":
        notes.append("vLLM and SGLang apply dynamic NTK statically at the full target length (their rotary cache "
                     "is fixed); transformers recomputes it per sequence length, so short inputs differ between them")
    keys = ("rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings",
            "original_max_position_embeddings")
    return config, {k: config[k] for k in keys if k in config}, notes


def _plain(rope: dict) -> dict:
    """Rope parameters without the legacy ``type`` alias (compared as transformers reads them)."""
    if any(isinstance(v, dict) for v in rope.values()):
        return {k: _plain(v) if isinstance(v, dict) else v for k, v in rope.items()}
    return {k: v for k, v in rope.items() if k != "type"}


def _reads_back(config: dict, rope: dict) -> bool:
    try:
        return _read_rope(config) == _plain(rope)
    except NotStandard:
        return False


def _read_rope(config: dict) -> dict:
    """``rope_parameters`` as transformers reads them from this config.json content (``NotStandard`` if its config
    class rejects them)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[config["model_type"]]
    data = {k: v for k, v in copy.deepcopy(config).items() if k not in ("model_type", "transformers_version")}
    try:
        return _plain(cls(**data).rope_parameters)
    except Exception as e:  # noqa: BLE001 - any validation error means: not expressible for this config class
        raise NotStandard(f"{cls.__name__} rejects them: {str(e).strip().splitlines()[-1]}") from None


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
