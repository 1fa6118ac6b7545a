#!/usr/bin/env bash
# Every GPU check of the project in one go, for a machine lent for a few minutes (issue 20's set by
# default, about 8 minutes at most): the gpu-marked tests, the bank-loss table (exact / fast /
# two_pass against the floor and float64), the real-size stage-2 step (CLIP4Cir ViT-L/14, SPRC
# BLIP-2), top-50 retrieval and bank building from an ImageStore. Each step has its own time limit
# and writes its log and JSON into DEST, so a step that fails or runs long costs only itself.
#
#   bash benchmarks/gpu_all.sh DEST
#   SKIP="retrieval bank_build" bash benchmarks/gpu_all.sh DEST     # leave steps out by name
#   SKIP="" bash benchmarks/gpu_all.sh DEST                          # also the older steps skipped by default
#   DRY=1 bash benchmarks/gpu_all.sh DEST                            # CPU dry run: tiny sizes, proves each step starts
#
# Skipped unless SKIP is set: the fused kernel's tile sweeps, the cut-cross-entropy rows and the CUDA
# quickstart (measured before, benchmarks/RESULTS.md issue 8). Run from the repository root.
set -u
DEST=${1:?usage: bash benchmarks/gpu_all.sh DEST}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SKIP=${SKIP-"fused_tune fused_tune_b32 fused_tune_b1024 bank_loss_cce quickstart_cuda"}
if [ -n "${DRY:-}" ]; then  # CPU, tiny sizes: timings mean nothing
    DEV="--device cpu"
    TESTS="--collect-only"  # some gpu-marked tests need CUDA to skip cleanly: only collected here
    BANK_LOSS="--smoke --two-pass-tiles BLOCK_N=64"
    STAGE2="--tiny"
    RETRIEVAL="--smoke"
    BUILD="--preset tiny --images 64 --rounds 1 --num-workers 1 --threads 1"
    TUNE="--B 5 --max-seconds 5"
    TUNE_TWO_PASS="env TRITON_INTERPRET=1 python3 benchmarks/fused_tune.py --smoke"
else
    DEV="--device cuda"
    TESTS=""
    BANK_LOSS="--grid must --max-seconds 100 --two-pass-tiles BLOCK_N=64;BLOCK_N=256;BLOCK_B=64,num_warps=4;chunk_mb=256;gemm_slice=0;gemm_slice=32768"
    STAGE2=""
    RETRIEVAL=""
    BUILD="--preset vitb16 --images 4096 --rounds 5 --num-workers 16"
    TUNE="--max-seconds 60"
    TUNE_TWO_PASS="python3 benchmarks/fused_tune.py --max-seconds 30"
fi
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped (SKIP)"; return 0 ;; esac
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$DEST/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0))s"
    tail -n 40 "$DEST/$name.log"
    [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
    return "$rc"
}
FAILED=""
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$DEST/env.log"
# correctness first: the kernels (incl. two_pass at B=256 N=100,003 D=768) against float64, the build's copy stream
# shellcheck disable=SC2086
step tests_gpu 90 python3 -m pytest -q -m gpu -p no:cacheprovider $TESTS tests/negatives/test_fused.py tests/negatives/test_loss.py \
    tests/evaluation/test_evaluation.py tests/test_gpu_scripts.py
# shellcheck disable=SC2086  # the option strings split into words on purpose
step bank_loss 130 python3 benchmarks/bank_loss_gpu.py $DEV $BANK_LOSS \
    --methods naive_bf16,fused,fused_fast,fused_two_pass --out "$DEST/bank_loss_gpu.json"
# shellcheck disable=SC2086
step stage2_real 180 python3 benchmarks/stage2_real.py $DEV $STAGE2 --out "$DEST/stage2_real_gpu.json"
# shellcheck disable=SC2086
step retrieval 75 python3 benchmarks/retrieval_gpu.py $DEV $RETRIEVAL --out "$DEST/retrieval_gpu.json"
# pass 1 of two_pass under the tuner's tile settings (bank_loss above varies pass 2)
# shellcheck disable=SC2086
step fused_tune_two_pass 45 $TUNE_TWO_PASS --precisions two_pass --out "$DEST/fused_tune_two_pass_gpu.json"
# shellcheck disable=SC2086
step bank_build 100 python3 benchmarks/bank_build.py $DEV $BUILD --source imagestore --out "$DEST/bank_build_gpu.json"
# the older steps (SKIP="" runs them)
# shellcheck disable=SC2086
step fused_tune 75 python3 benchmarks/fused_tune.py $TUNE --out "$DEST/fused_tune_gpu.json"
step fused_tune_b32 40 python3 benchmarks/fused_tune.py --B 32 --max-seconds 25 --out "$DEST/fused_tune_b32_gpu.json"
step fused_tune_b1024 40 python3 benchmarks/fused_tune.py --B 1024 --max-seconds 25 --out "$DEST/fused_tune_b1024_gpu.json"
# cut-cross-entropy in its own process: a crash inside it (an illegal memory access was seen with
# 25.1.1 on torch 2.11 / triton 3.6) poisons the CUDA context of the process it runs in
step bank_loss_cce 60 python3 benchmarks/bank_loss_gpu.py --grid must --methods chunked,cce,cce_exact \
    --out "$DEST/bank_loss_cce_gpu.json"
QS="${TMPDIR:-/tmp}/cir_quickstart_cuda"  # its cache holds images: keep it out of DEST
rm -f "$QS/results.json"
step quickstart_cuda 60 python3 examples/quickstart.py --quick --device cuda --no-progress --out "$QS" \
    && if [ -f "$QS/results.json" ]; then cp "$QS/results.json" "$DEST/quickstart_cuda.json"; fi
if [ -n "$FAILED" ]; then
    echo "failed:$FAILED (logs in $DEST)"
    exit 1
fi
echo "all steps passed (logs and JSON in $DEST)"
