"""Build ``sotu-quotes``: a real retrieval task in LongEmbed's layout from public-domain text, offline.

The corpus is the 65 State of the Union addresses 1945-2006 in ``../shared/data/state_union`` (public domain), one
document per address. Each query is one sentence of an address, verbatim ("Which address says this?"); its one
relevant document is that address. Per address the sentences are drawn (seeded) from three bands of token depth in
the address, counted with the evaluated model's tokenizer: the first 512 tokens, 512-2048 and 2048-4096, one
sentence of 12-60 words each — so a model that reads only its first 512 tokens can find a third of them, and every
query is answerable from the first 4096 tokens of its address. Addresses shorter than a band give no query there.

    python bench/sotu_task.py OUT                # OUT/corpus.jsonl, queries.jsonl, qrels.jsonl, README.md
    longctx eval retrieval --model minilm --data OUT --max-length 512,1024,2048,4096 \\
        --compare truncate,grouped,pi,pcw,recurrent --out results-sotu
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(os.environ.get("LONGCTX_SHARED", ROOT.parent / "shared")) / "data" / "state_union"
BANDS = ((0, 512), (512, 2048), (2048, 4096))  # token depths of the quoted sentence (start and end inside the band)


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text`` (split after . ! ? followed by a space)."""
    spans, start = [], 0
    for m in re.finditer(r"[.!?][\"')\]]?\s+", text):
        spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def build(out: Path, tokenizer, seed: int = 0) -> dict:
    """Write the task into ``out``; returns its counts."""
    rng = random.Random(seed)
    files = sorted(p for p in SOURCE.glob("*.txt") if p.stem[:4].isdigit())
    corpus, queries, qrels = [], [], []
    for path in files:
        text = " ".join(path.read_text(encoding="latin-1").split())  # one line: whitespace normalised
        doc = path.stem
        corpus.append({"doc_id": doc, "text": text})
        ends = [e for _, e in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                        verbose=False)["offset_mapping"]]

        def depth(char: int) -> int:  # tokens before this character
            lo, hi = 0, len(ends)
            while lo < hi:
                mid = (lo + hi) // 2
                if ends[mid] <= char:
                    lo = mid + 1
                else:
                    hi = mid
            return lo

        spans = sentences(text)
        for b, (lo, hi) in enumerate(BANDS):
            pool = [(s, e) for s, e in spans if lo <= depth(s) and depth(e - 1) < hi
                    and 12 <= len(text[s:e].split()) <= 60]
            if not pool:
                continue
            s, e = rng.choice(pool)
            qid = f"{doc}-q{b}"
            queries.append({"qid": qid, "text": text[s:e].strip(), "band": f"{lo}-{hi}", "depth": depth(s)})
            qrels.append({"qid": qid, "doc_id": doc, "relevance": 1})
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    counts = {"documents": len(corpus), "queries": len(queries),
              "per_band": {f"{lo}-{hi}": sum(q["band"] == f"{lo}-{hi}" for q in queries) for lo, hi in BANDS}}
    (out / "README.md").write_text(
        "# sotu-quotes\n\n" + __doc__.split("\n\n")[1] + "\n\n" + json.dumps(counts) + f"\n\nseed {seed}; built by "
        "bench/sotu_task.py from ../shared/data/state_union.\n")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from longctx.loading import load_model

    counts = build(args.out, load_model("minilm").tokenizer, args.seed)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
