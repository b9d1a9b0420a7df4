"""Shared fixtures: tiny models built from configs of every supported family, paths to ../shared."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on CPU (set before they compile)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LONGCTX_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories"

TRAINED = 64  # trained length of every tiny model

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=TRAINED,
    initializer_range=0.3,  # large enough that positions visibly move the logits
)

# model_type -> (config overrides, auto class name)
FAMILIES = {
    "llama": ({}, "AutoModelForCausalLM"),
    "mistral": ({"sliding_window": None}, "AutoModelForCausalLM"),
    "qwen2": ({}, "AutoModelForCausalLM"),
    "qwen3": ({"head_dim": 8}, "AutoModelForCausalLM"),
    "gemma": ({"head_dim": 8}, "AutoModelForCausalLM"),
    "gemma3_text": (
        {"head_dim": 8, "num_hidden_layers": 3, "sliding_window": 16,
         "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
        "AutoModelForCausalLM",
    ),
    "phi3": ({"original_max_position_embeddings": TRAINED, "pad_token_id": 0}, "AutoModelForCausalLM"),
    "gpt_neox": ({"rotary_pct": 0.5}, "AutoModelForCausalLM"),
    "modernbert": (
        {
            "num_hidden_layers": 3,
            "global_attn_every_n_layers": 3,
            "local_attention": 16,
            "pad_token_id": 0,
            "initializer_cutoff_factor": 2.0,
        },
        "AutoModelForMaskedLM",
    ),
    "gte": ({"pad_token_id": 0}, "AutoModelForMaskedLM"),  # RoPE encoders as transformers implements them
    "nomic_bert": ({"pad_token_id": 0}, "AutoModelForMaskedLM"),
}
ENCODERS = ("modernbert", "gte", "nomic_bert")


def family_config(model_type: str, rope_parameters=None, **extra):
    from transformers import AutoConfig

    overrides, _ = FAMILIES[model_type]
    kwargs = {**_COMMON, **overrides, **extra}
    if model_type == "gpt_neox":
        kwargs.pop("num_key_value_heads")
    if model_type in ENCODERS:
        kwargs.pop("num_key_value_heads")
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("sliding_window",)}
    config = AutoConfig.for_model(model_type, **kwargs)
    if rope_parameters is not None:
        # assigned after construction: some configs (Phi3) only validate 'default'/'longrope' at construction,
        # while their rotary class computes any ROPE_INIT_FUNCTIONS type
        config.rope_parameters = copy.deepcopy(rope_parameters)
    config._attn_implementation = "eager" if model_type == "gemma3_text" else "sdpa"
    return config


def build(model_type: str, rope_parameters=None, state_dict=None, seed: int = 0, **extra):
    import transformers

    config = family_config(model_type, rope_parameters, **extra)
    auto = getattr(transformers, FAMILIES[model_type][1])
    torch.manual_seed(seed)
    model = auto.from_config(config, attn_implementation=config._attn_implementation).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run the slow real-model tests")


def pytest_collection_modifyitems(config, items):
    # deselected, not skipped: the default run is the representative CI subset, --runslow is the full run; the
    # `gpu` tests (Triton compiled, accelerate GPU/CPU splits) run wherever CUDA is, and are deselected elsewhere
    drop = set()
    if not (config.getoption("--runslow") or os.environ.get("LONGCTX_RUNSLOW") == "1"):
        drop.add("slow")
    if not torch.cuda.is_available():
        drop.add("gpu")
    gone = [item for item in items if drop & set(item.keywords)]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = [item for item in items if not drop & set(item.keywords)]


@pytest.fixture(scope="session")
def stories_path():
    if not (STORIES / "model.safetensors").exists():
        pytest.skip(f"stories260K not found at {STORIES} (shared/ is laid out beside the repo in CI)")
    return STORIES


@pytest.fixture(scope="session")
def tinystories_text():
    path = TINYSTORIES / "tinystories_valid_subset.txt"
    if not path.exists():
        pytest.skip(f"TinyStories text not found at {path}")
    return path.read_text() + "\n" + (TINYSTORIES / "tinystories_a.txt").read_text()
