#!/usr/bin/env bash
# docs/results.md's RULER table for SmolLM2-135M-Instruct (trained 8192): the 11 synthetic tasks, one sample per task
# and length, vanilla against yarn, selfextend, dca, rerope (each patched once to 16384) and string (patched to
# 12288: STRING reaches fewer than 2L - 1 = 16383 tokens, so it has no 16384 column). Ordered so that a stopped run
# has whole lengths: every method at 4096 and 8192 first, then 12288, then 16384. Every finished sample is appended
# to $OUT/trials.jsonl; rerunning this script resumes where a stopped run left off (--resume). On 2 CPU cores a
# sample takes 12-44 s at 4096, 33-72 s at 8192, 63-111 s at 12288 and 95-160 s at 16384 (about 4.5 h for the 253
# samples): a job for a lent GPU or a night.
# The last two commands only read the log and write the tables, JSON / CSV and heat maps.
set -euo pipefail
export HF_HUB_OFFLINE=1
OUT=${1:-results/ruler-smollm2}
M=vanilla,yarn,selfextend,dca,rerope
run() { longctx eval ruler --model smollm2 --samples 1 --target-length 16384 --out "$OUT" --resume "$@"; }
run --compare $M,string --lengths 4096,8192 --param string.target_length=12288 --no-plots
run --compare $M,string --lengths 12288 --param string.target_length=12288 --no-plots
run --compare $M --lengths 16384 --no-plots
# the report: one table per method (string apart: no 16384 column); a copy of the log for each, so neither run
# appends to the other's file
for part in main string; do
  mkdir -p "$OUT/$part" && cp "$OUT/trials.jsonl" "$OUT/$part/trials.jsonl"
done
longctx eval ruler --model smollm2 --compare $M --lengths 4096,8192,12288,16384 --target-length 16384 \
  --out "$OUT/main" --resume
longctx eval ruler --model smollm2 --compare string --lengths 4096,8192,12288 --target-length 16384 \
  --param string.target_length=12288 --out "$OUT/string" --resume
