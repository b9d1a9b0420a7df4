"""Export time of a config-only method ÷ a plain copy of the same files (goal ≤ 1.2).

Builds a Llama-architecture checkpoint of about ``--megabytes`` of bf16 weights (TinyLlama-1.1B's shapes, layers
cut or added to reach the size; two safetensors shards + index, a tokenizer_config.json), then times, interleaved in
one process, ``shutil.copytree`` of the directory and ``longctx.export(dir, out, "yarn", factor=4)`` (which copies
the weights and rewrites config.json; the method is resolved on a weightless meta-device skeleton). Medians of
``--repeats`` (the order alternates), each timing from a synced page cache to its data synced to disk
(``os.sync()``), so that neither inherits the other's write-back; outputs are deleted only at the end (freeing
blocks between timings slowed whichever write came next). Needs 2 × repeats × the size in free disk. The last line
printed is the JSON report.

    python bench/export_speed.py                       # ~2.2 GB, 5 repeats
    python bench/export_speed.py --megabytes 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import longctx

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000


def _layer(i: int) -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // HEADS * KV_HEADS
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,)}


def build_checkpoint(folder: Path, megabytes: float) -> int:
    """A Llama checkpoint of about ``megabytes`` (bf16; at least one layer, small sizes shrink the vocabulary)."""
    folder.mkdir(parents=True)
    per_layer = sum(torch.Size(s).numel() for s in _layer(0).values()) * 2 / 2**20
    vocab = VOCAB if megabytes > 600 else max(256, int(megabytes * 2**20 / 2 / HIDDEN / 4))
    fixed = 2 * vocab * HIDDEN * 2 / 2**20
    layers = max(1, round((megabytes - fixed) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "lm_head.weight": (vocab, HIDDEN),
              "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        shapes.update(_layer(i))
    names = list(shapes)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    index, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        tensors = {n: torch.randn(shapes[n], generator=gen).to(torch.bfloat16) for n in shard}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        index.update({n: file for n in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": index}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "dtype": "bfloat16", "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=2100.0, help="checkpoint size (default: ~TinyLlama-1.1B)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        src = work / "src"
        size = build_checkpoint(src, args.megabytes)
        longctx.export(src, work / "warm", "yarn", factor=4, progress=False)  # imports, page cache
        steps = {"copy": lambda dst: shutil.copytree(src, dst),
                 "export": lambda dst: longctx.export(src, dst, "yarn", factor=4, progress=False)}
        times: dict[str, list[float]] = {"copy": [], "export": []}
        for i in range(args.repeats):
            for name in (("copy", "export") if i % 2 == 0 else ("export", "copy")):  # alternate the order
                os.sync()  # neither timing inherits the other's write-back; each ends with its data on disk
                start = time.perf_counter()
                steps[name](work / f"{name}{i}")
                os.sync()
                times[name].append(time.perf_counter() - start)
        copies, exports = times["copy"], times["export"]
        report = {"bytes": size, "repeats": args.repeats, "copy_seconds": statistics.median(copies),
                  "export_seconds": statistics.median(exports),
                  "ratio": statistics.median(exports) / statistics.median(copies),
                  "copies": copies, "exports": exports}
        print(f"{size / 2**30:.2f} GiB: plain copy {report['copy_seconds']:.2f} s, export {report['export_seconds']:.2f} s"
              f" -> ratio {report['ratio']:.2f} (goal <= 1.2)")
        print(json.dumps(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
