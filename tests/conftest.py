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


def _known(model_types):
    """The families this transformers release has (GTE arrived after 5.17: the suite runs on older 5.x too)."""
    from transformers import CONFIG_MAPPING

    return [t for t in model_types if t in CONFIG_MAPPING]


FAMILIES = {t: FAMILIES[t] for t in _known(FAMILIES)}


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


IMAGE = 100  # the image token of the tiny vision-language models
VLM_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=TRAINED, initializer_range=0.3)


def kernel_llama(device: str = "cpu"):
    """A tiny GQA Llama with a head dim the Triton kernels take (32; the battery's tiny models use 8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED,
                         initializer_range=0.3)
    return LlamaForCausalLM(config).eval().to(device)


def build_vlm(family: str):
    """A tiny vision-language model (llava, internvl, gemma3) from its config."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    if family == "llava":
        config = AutoConfig.for_model(
            "llava", vision_config={**vision, "model_type": "clip_vision_model", "image_size": 16, "patch_size": 4},
            text_config={**VLM_TEXT, "model_type": "llama"}, image_token_index=IMAGE, vision_feature_layer=-1)
    elif family == "internvl":
        config = AutoConfig.for_model(
            "internvl", vision_config={**vision, "model_type": "internvl_vision", "image_size": [16, 16],
                                       "patch_size": [4, 4]},
            text_config={**VLM_TEXT, "model_type": "qwen2"}, image_token_id=IMAGE, downsample_ratio=0.5,
            vision_feature_layer=-1)
    else:
        config = AutoConfig.for_model(
            "gemma3", vision_config={**vision, "model_type": "siglip_vision_model", "image_size": 16, "patch_size": 4},
            text_config={**VLM_TEXT, "model_type": "gemma3_text", "head_dim": 8, "sliding_window": 16,
                         "layer_types": ["sliding_attention", "full_attention"]},
            image_token_index=IMAGE, mm_tokens_per_image=4)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval()


def build_bert(seed: int = 0):
    """A tiny BERT encoder (learned absolute positions, trained length TRAINED)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=TRAINED, pad_token_id=0)).eval()


def word_tokenizer(model_max_length: int = TRAINED):
    """A whitespace word-level tokenizer over w0 … w99 (ids 4 … 103), [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i + 4 for i in range(100)}}
    backend = Tokenizer(models.WordLevel(vocab, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                   ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=model_max_length)


def build_sentence_transformer(model, folder):
    """``model`` (an encoder) saved to ``folder`` with :func:`word_tokenizer`, wrapped by sentence-transformers
    (mean pooling, max_seq_length = TRAINED)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer

    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    transformer = Transformer(str(folder), max_seq_length=TRAINED)
    pooling = Pooling(transformer.get_embedding_dimension())
    return SentenceTransformer(modules=[transformer, pooling], device="cpu").eval()


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
