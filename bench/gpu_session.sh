#!/usr/bin/env bash
# Everything a lent GPU is for, in one call from the repository root (at most 9 minutes on an H100 / H200):
#
#   bash bench/gpu_session.sh            # results in $OUT (the device tool's output folder) or results/gpu/
#
# 1. the Triton tests compiled on the GPU that a CPU cannot run: the model-level Triton tests, the accelerate
#    GPU/CPU split (tests/gpu), the offline-compile checks (for sm_90 from this machine's own triton);
# 2. bench/attention_gpu.py (prefill, decode, CUDA-graph decode with the decode-configuration sweep, the SmolLM2-shaped
#    model end to end, the fp32 generation check, the pair-map kernel's prefill and decode): JSON + its printed table;
#    then the pair-map kernel's compiled tests;
# 3. with the time left, the kernel grid (tests/kernels, bf16 included) compiled.
# Each step has its own time limit, so a slow step cannot eat the others' time. The device's python has torch,
# triton and transformers but not longctx: the package is put on PYTHONPATH with its installed layout
# (patches/ -> longctx/patches, eval/ -> longctx/eval) and pytest runs from outside the checkout, so that the
# checkout's top-level longctx/ does not shadow it.
set -u
REPO=$(pwd)
OUT=${OUT:-$REPO/results/gpu}
mkdir -p "$OUT"
SHIM=$(mktemp -d)
cp -r "$REPO/longctx" "$SHIM/longctx"
rm -rf "$SHIM/longctx/patches" "$SHIM/longctx/eval"
cp -r "$REPO/patches" "$SHIM/longctx/patches"
cp -r "$REPO/eval" "$SHIM/longctx/eval"
export PYTHONPATH="$SHIM" HF_HUB_OFFLINE=1 LONGCTX_TRITON_TUNE=0 TOKENIZERS_PARALLELISM=false
started=$(date +%s)
step() {  # step NAME LIMIT_SECONDS COMMAND...: output to $OUT/NAME.txt, one summary line here
    local name=$1 limit=$2
    shift 2
    (cd /tmp && timeout "$limit" "$@") >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: rc=$rc, $(($(date +%s) - started)) s in; $(tail -n 1 "$OUT/$name.txt")"
}
PYTEST=(python -m pytest -q -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO")
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
step tests-model 150 "${PYTEST[@]}" -m "not slow" "$REPO/tests/gpu" "$REPO/tests/kernels/test_offline_compile.py" \
    "$REPO/tests/patches/test_selfextend.py" -k "gpu or triton or Triton or offline or device_map"
# autotuned prefill (LONGCTX_TRITON_TUNE unset): the bench measures the configurations the kernel picks
step bench 400 env -u LONGCTX_TRITON_TUNE python "$REPO/bench/attention_gpu.py" --out "$OUT/attention_gpu.json"
# the pair-map kernel (DCA, ReRoPE) compiled: its kernel grid and the model-level tests with the Triton backend
step tests-pairmap 120 "${PYTEST[@]}" -x "$REPO/tests/kernels/test_pairmap_triton.py" \
    "$REPO/tests/patches/test_pairmap_methods.py" -k "triton or Triton"
left=$((540 - ($(date +%s) - started)))
if [ "$left" -gt 30 ]; then
    step tests-kernels "$left" "${PYTEST[@]}" -x "$REPO/tests/kernels/test_selfextend_triton.py"
fi
echo "done in $(($(date +%s) - started)) s; files in $OUT"
