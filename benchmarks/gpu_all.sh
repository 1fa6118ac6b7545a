#!/usr/bin/env bash
# Every GPU check of the project in one go, for a machine lent for a few minutes: the gpu-marked
# tests, the fused kernel's tile sweep, the bank-loss table, GPU retrieval, bank building and the
# quickstart on CUDA. Each step has its own time limit and writes its log and JSON into DEST, so a
# step that fails or runs long costs only itself.
#
#   bash benchmarks/gpu_all.sh DEST
#   SKIP="retrieval bank_build" bash benchmarks/gpu_all.sh DEST     # leave steps out by name
#
# Optional: cut-cross-entropy importable (pip install cut-cross-entropy) adds its rows to the
# bank-loss table. Run from the repository root.
set -u
DEST=${1:?usage: bash benchmarks/gpu_all.sh DEST}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
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
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$DEST/env.log"
step tests_gpu 75 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py tests/test_loss.py tests/test_evaluation.py
step fused_tune 75 python3 benchmarks/fused_tune.py --max-seconds 60 --out "$DEST/fused_tune_gpu.json"
step fused_tune_b32 40 python3 benchmarks/fused_tune.py --B 32 --max-seconds 25 --out "$DEST/fused_tune_b32_gpu.json"
step fused_tune_b1024 40 python3 benchmarks/fused_tune.py --B 1024 --max-seconds 25 --out "$DEST/fused_tune_b1024_gpu.json"
step bank_loss 180 python3 benchmarks/bank_loss_gpu.py --max-seconds 140 \
    --methods naive_fp32,naive_bf16,chunked,fused,fused_fast --out "$DEST/bank_loss_gpu.json"
# cut-cross-entropy in its own process: a crash inside it (an illegal memory access was seen with
# 25.1.1 on torch 2.11 / triton 3.6) poisons the CUDA context of the process it runs in
step bank_loss_cce 60 python3 benchmarks/bank_loss_gpu.py --grid must --methods chunked,cce,cce_exact \
    --out "$DEST/bank_loss_cce_gpu.json"
step retrieval 45 python3 benchmarks/retrieval_gpu.py --out "$DEST/retrieval_gpu.json"
step bank_build 50 python3 benchmarks/bank_build.py --preset vitb16 --device cuda --images 4096 --rounds 2 --num-workers 4 --out "$DEST/bank_build_gpu.json"
QS="${TMPDIR:-/tmp}/cir_quickstart_cuda"  # its cache holds images: keep it out of DEST
rm -f "$QS/results.json"
step quickstart_cuda 60 python3 examples/quickstart.py --quick --device cuda --no-progress --out "$QS" \
    && if [ -f "$QS/results.json" ]; then cp "$QS/results.json" "$DEST/quickstart_cuda.json"; fi
if [ -n "$FAILED" ]; then
    echo "failed:$FAILED (logs in $DEST)"
    exit 1
fi
echo "all steps passed (logs and JSON in $DEST)"
