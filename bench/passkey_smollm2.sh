#!/usr/bin/env bash
# docs/results.md's SmolLM2 passkey table, from the CLI: 10 trials per cell in two rounds of seeded keys (seed 0 at depths
# 0.1…0.9, seed 100 at 0.0…0.8), each method patched to the prompt length. Every finished trial is appended to
# $OUT/trials.jsonl; rerunning this script resumes where a stopped run left off (--resume). 91 minutes on a
# 2-core CPU; the last command's table is the whole grid.
set -euo pipefail
export HF_HUB_OFFLINE=1
OUT=${1:-results/passkey-smollm2}
for round in "0 0.1,0.3,0.5,0.7,0.9" "100 0,0.2,0.4,0.6,0.8"; do
  set -- $round
  for n in 16384 12288; do
    longctx eval passkey --model smollm2 --compare selfextend,vanilla,yarn --lengths $n --target-length $n \
      --seed $1 --depths $2 --out "$OUT" --resume
  done
  longctx eval passkey --model smollm2 --lengths 8192 --seed $1 --depths $2 --out "$OUT" --resume
done
