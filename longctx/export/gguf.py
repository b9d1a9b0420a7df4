"""The GGUF writer of an export: a file llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs extended.

Written with the ``gguf`` package (the format's own reader and writer, from llama.cpp). The rope metadata comes from
:func:`longctx.patches.portable.gguf_rope` (what llama.cpp reads, by rope type); the weights come from:

* a ``.gguf`` source: every tensor and every key copied as they are (any architecture llama.cpp knows), the rope keys
  replaced; re-typed only when ``gguf_type`` is given (de-quantised with ``gguf.quants`` and written as f32 / f16 /
  q8_0; norms and other 1-D tensors stay f32, as llama.cpp's converter keeps them);
* a Hugging Face model (Llama-family: ``llama``, ``mistral``; ``qwen2``, ``qwen3``): its state dict, named by
  ``gguf.TensorNameMap``, the query / key rows of the Llama family permuted into llama.cpp's interleaved rotary
  layout (what llama.cpp's ``convert_hf_to_gguf.py`` does, a two-line reshape), its tokenizer through
  ``gguf.vocab`` (SentencePiece-style ``tokenizer.json`` as llama.cpp's converter reads it; other tokenizers as BPE
  with llama.cpp's default pre-tokenizer — ids are the same, text may split differently: convert such a model with
  llama.cpp's own converter and export from that ``.gguf`` for exact tokenization). Why by hand: the ``gguf``
  package has no Hugging Face converter, and llama.cpp's script is not a library (not on PyPI).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longctx.patches.portable import GGUFRope, NotStandard

__all__ = ["GGUF_TYPES", "HF_ARCHS", "write_gguf_export", "write_gguf", "verify_gguf", "rope_inputs",
           "llama_cpp_logits"]

GGUF_TYPES = ("f32", "f16", "q8_0")
HF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # model_type -> GGUF arch
PERMUTED = {"llama"}  # GGUF archs whose q / k rows llama.cpp expects interleaved (rope mode NORM)
TENSOR_ARCHS = {"llama"}  # archs that load rope_freqs / rope_factors_* (src/models/llama.cpp)
ROPE_KEYS = ("rope.freq_base", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
             "rope.scaling.attn_factor", "rope.scale_linear", "rope.scaling.yarn_log_multiplier", "context_length")
ROPE_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("a GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _qtype(name: str) -> Any:
    G = _gguf().GGMLQuantizationType
    return {"f32": G.F32, "f16": G.F16, "q8_0": G.Q8_0}[name]


def _typed(array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw dtype) of a float array written as ``gguf_type``; 1-D tensors (norms, biases) stay f32, as do
    rows q8_0 cannot block (a last dimension not a multiple of 32)."""
    gguf = _gguf()
    G = gguf.GGMLQuantizationType
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or gguf_type == "f32":
        return array, G.F32
    if gguf_type == "f16":
        return array.astype(np.float16), G.F16
    if array.shape[-1] % 32:
        return array, G.F32
    return gguf.quants.quantize(array, G.Q8_0), G.Q8_0


def _add_rope(writer: Any, arch: str, rope: GGUFRope, context: int) -> None:
    for key, value in rope.kv.items():
        full = f"{arch}.{key}"
        if isinstance(value, str):
            writer.add_string(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        else:
            writer.add_float32(full, float(value))
    writer.add_uint32(f"{arch}.context_length", int(context))
    if rope.tensors and arch not in TENSOR_ARCHS:
        raise NotStandard(f"llama.cpp's '{arch}' architecture loads no per-pair rope tensors "
                          f"({', '.join(rope.tensors)}); this rope type is written for the llama architecture only")
    for name, values in rope.tensors.items():
        writer.add_tensor(f"{name}.weight", np.asarray(values, dtype=np.float32))


def write_gguf_export(partial: Path, opened: Any, gguf_type: str | None) -> tuple[str, dict, list[str]]:
    """Write the export's GGUF file ``partial`` from an opened source (``sources.open_source``, weights loaded):
    ``(form, keys written, notes)``. The rope metadata is the patched model's (config-form methods); a method of
    the longctx form that llama.cpp runs its own way on the base model (``Method.engines``) gets the base model's
    rope and its serve line; any other raises :class:`NotStandard`."""
    from .. import api
    from longctx.patches import portable

    model, info, form = opened.model, opened.info, opened.form
    served = opened.spec.engine_lines(info.params).get("llama.cpp") if form != "config" else None
    notes = list(info.notes)
    if form == "config":
        rope = portable.gguf_rope(*rope_inputs(model), int(info.trained_length))
        context = int(info.target_length or info.trained_length)
    elif served is not None and served[0]:  # run on the base model's file (SelfExtend's llama.cpp port)
        with api.unpatched(model):
            rope = portable.gguf_rope(*rope_inputs(model), int(info.trained_length))
        notes.append(f"llama.cpp: {served[1]}")
        context = int(info.trained_length)
    else:
        raise NotStandard(f"no GGUF form for '{info.method}': {served[1] if served else 'llama.cpp does not run it'}")
    notes += rope.notes
    with api.unpatched(model):  # the weights are the base model's; the extension is in the rope metadata
        keys = write_gguf(partial, model=model, tokenizer=opened.tokenizer, rope=rope, context=context,
                          gguf_type=gguf_type, source_gguf=opened.source.gguf, name=Path(opened.source.label).name)
    keys["gguf_type"] = gguf_type or ("as the source" if opened.source.gguf else "f16")
    return "gguf", keys, notes


def write_gguf(path: Path, *, model: Any, tokenizer: Any, rope: GGUFRope, context: int, gguf_type: str | None,
               source_gguf: Path | None, name: str) -> dict[str, Any]:
    """Write ``path`` (a ``.gguf`` file): the source's tensors (``source_gguf``) or ``model``'s (a Hugging Face
    model, unpatched weights), with the rope metadata ``rope`` and ``{arch}.context_length`` = ``context``.
    Returns the rope keys written (for the card)."""
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {list(GGUF_TYPES)}, got {gguf_type!r}")
    if source_gguf is not None:
        arch = _copy_gguf(path, source_gguf, rope, context, gguf_type)
    else:
        arch = _from_hf(path, model, tokenizer, rope, context, gguf_type or "f16", name)
    return {f"{arch}.{k}": v for k, v in {**rope.kv, "context_length": int(context)}.items()}


def _copy_gguf(path: Path, source: Path, rope: GGUFRope, context: int, gguf_type: str | None) -> str:
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(path), arch)
    skip = {f"{arch}.{k}" for k in ROPE_KEYS} | {"general.architecture", "general.file_type"}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), vtype)
    _add_rope(writer, arch, rope, context)
    for tensor in reader.tensors:
        if tensor.name.split(".")[0] in ROPE_TENSORS:
            continue  # replaced by the method's (or dropped: the method's frequencies are in the keys)
        if gguf_type is None or tensor.tensor_type == _qtype(gguf_type):
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest first
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        data, raw = _typed(values, gguf_type)
        writer.add_tensor(tensor.name, data, raw_dtype=raw)
    _finish(writer)
    return arch


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q / k from transformers' half-split rotary layout to llama.cpp's interleaved one."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _from_hf(path: Path, model: Any, tokenizer: Any, rope: GGUFRope, context: int, gguf_type: str, name: str) -> str:
    gguf = _gguf()
    config = model.config
    model_type = getattr(config, "model_type", None)
    arch = HF_ARCHS.get(model_type)
    if arch is None:
        raise NotStandard(f"longctx writes GGUF from Hugging Face {sorted(HF_ARCHS)} models; for '{model_type}', "
                          "convert the base model with llama.cpp's convert_hf_to_gguf.py and export from that .gguf "
                          "(any architecture llama.cpp knows)")
    n_layer, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(n_layer)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    _add_rope(writer, arch, rope, context)
    _add_vocab(writer, tokenizer, config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layer)
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for key, tensor in state.items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise NotStandard(f"no GGUF name for the tensor {key} of a '{model_type}' model")
        values = tensor.detach().to(torch.float32).cpu().numpy()
        if arch in PERMUTED and key.endswith("q_proj.weight"):
            values = _permute(values, n_head)
        elif arch in PERMUTED and key.endswith("k_proj.weight"):
            values = _permute(values, n_kv)
        data, raw = _typed(values, gguf_type)
        writer.add_tensor(target, data, raw_dtype=raw)
    _finish(writer)
    return arch


def _add_vocab(writer: Any, tokenizer: Any, config: Any) -> None:
    gguf = _gguf()
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    if tokenizer is None or not (folder / "tokenizer.json").exists():
        raise NotStandard("a GGUF export from a Hugging Face model needs its tokenizer.json beside it")
    import json

    model_kind = json.loads((folder / "tokenizer.json").read_text()).get("model", {})
    if model_kind.get("type") == "BPE" and model_kind.get("byte_fallback"):  # SentencePiece-style (Llama 1/2)
        vocab = gguf.vocab.LlamaHfVocab(folder)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types([int(t) for t in types])
        merges = False
    else:  # byte-level BPE (GPT-2 style)
        vocab_map = tokenizer.get_vocab()
        added = set(tokenizer.get_added_vocab())
        by_id = {i: t for t, i in vocab_map.items()}
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config.vocab_size)]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([int(gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL) for t in tokens])
        merges = True
    gguf.vocab.SpecialVocab(folder, load_merges=merges, n_vocab=config.vocab_size).add_to_gguf(writer)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def verify_gguf(model: Any, path: Path, trained: int, target: int, extended: bool, exact: bool,
                tokenizer: Any = None) -> dict[str, Any]:
    """llama.cpp's logits of the written file against the patched model's past the trained length, on the bundled
    text in the model's tokens (random tokens without a tokenizer: their flat predictions make top-1 agreement a
    harsher test of quantised weights). ``exact`` (f32 weights): within 1 % of the largest logit and the same top-1
    token at ≥ 99 % of positions — llama.cpp sums in another order and computes its angles in fp32; f16 / q8_0 /
    quantised sources: the same top-1 token at ≥ 90 % of positions (94.7 … 100 % measured on text,
    docs/results.md). Raises ``ExportError`` otherwise."""
    from importlib import resources

    from ..models import unwrap
    from .files import ExportError

    n = min(target, trained + 64) if extended and target else min(trained, 128)
    hf = unwrap(model)
    vocab = hf.config.vocab_size
    ids, source = None, "random"
    if tokenizer is not None:
        text = resources.files("longctx.data").joinpath("emma_austen_1816.txt").read_text()
        found = tokenizer(text, add_special_tokens=False).input_ids
        if len(found) >= n:
            ids, source = torch.tensor([found[:n]]), "the bundled text (Emma)"
    if ids is None:
        ids = torch.randint(min(5, vocab - 1), vocab, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids.to(next(hf.parameters()).device)).logits[0].float().cpu().numpy()
    got = llama_cpp_logits(path, ids[0].tolist(), n_ctx=max(n, target if extended else trained))
    diff, scale = float(np.abs(expected - got).max()), float(np.abs(expected).max())
    top1 = float((expected.argmax(-1) == got.argmax(-1)).mean())
    if (exact and (diff > 1e-2 * max(1.0, scale) or top1 < 0.99)) or (not exact and top1 < 0.9):
        raise ExportError(f"llama.cpp's logits of the GGUF differ from the patched model's (max |Δ| {diff:.3g}, "
                          f"top-1 agreement {top1:.1%} at {n} tokens): the export is not written")
    return {"tokens": n, "max_abs_diff": diff, "max_abs_output": scale, "top1_agreement": top1,
            "engine": "llama.cpp (llama-cpp-python)", "text": source}


def rope_inputs(model: Any) -> tuple[dict, Any, float, Any]:
    """``(rope parameters, inv_freq, attention factor, plain-θ inv_freq)`` of a patched decoder, from transformers'
    own rope functions (what its forward uses)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ..models import find_rotary_modules

    rotary = find_rotary_modules(model)
    if not rotary:
        raise NotStandard("no rotary embedding found: GGUF exports are for RoPE decoders")
    module = rotary[0].module
    params = dict(module.config.rope_parameters)
    if any(isinstance(v, dict) for v in params.values()):
        raise NotStandard("per-layer-type rope parameters have no GGUF form in longctx")
    kind = params.get("rope_type", "default")
    init = module.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS.get(kind)
    if init is None:
        raise NotStandard(f"rope type '{kind}' has no GGUF form")
    inv_freq, attention = init(module.config) if kind != "dynamic" else (None, 1.0)
    dim = inv_freq.numel() * 2 if inv_freq is not None else 0
    base = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return params, None if inv_freq is None else inv_freq.double().numpy(), float(attention), base.numpy()



def llama_cpp_logits(path: str | Path, ids: list[int], n_ctx: int, threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits (n_tokens × vocab) for the token ids ``ids`` run through the GGUF file ``path``, with an
    f32 KV cache and a context of ``n_ctx`` (llama-cpp-python; ``pip install llama-cpp-python`` builds llama.cpp)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ImportError("checking a GGUF with llama.cpp needs llama-cpp-python: pip install llama-cpp-python "
                          "(it builds llama.cpp from source, a few minutes)") from None
    llm = Llama(model_path=str(path), n_ctx=int(n_ctx), n_batch=min(512, int(n_ctx)), n_ubatch=min(512, int(n_ctx)),
                logits_all=True, type_k=0, type_v=0, n_threads=threads or max(1, (os.cpu_count() or 2)),
                verbose=False)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
