#!/usr/bin/env bash
# The quickstart's held-out table on one GPU machine: worlds 1-4 x training seeds 0-1 (one process per world,
# side by side, sharing one OUT so each writes the table of every finished world), plus the tuning world 0 with
# the same two seeds (its val numbers are what the selection protocol reads). Default budget, CUDA.
#
#   bash benchmarks/quickstart_heldout_gpu.sh DEST [WORLDS]     # DEST: where the tables come back
#
# Writes DEST/heldout.{json,md,png}, DEST/report.{png,html,json} (world 1, seed 0: +P+N vs the baseline),
# DEST/runs.tar.gz (every world's results.json with per-query ranks, world 0's run) and DEST/log.txt.
set -u -o pipefail
DEST=${1:?usage: quickstart_heldout_gpu.sh DEST [WORLDS]}
WORLDS=${2:-"1 2 3 4"}
LIMIT=${LIMIT:-520}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=${WORK:-/tmp/heldout}
mkdir -p "$DEST" "$WORK"
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-3}
nvidia-smi -L 2>/dev/null || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
started=$(date +%s)
pids=()
first=1
for w in $WORLDS; do
  extra=()
  [ $first = 1 ] || extra=(--no-report)
  first=0
  timeout "$LIMIT" python3 examples/quickstart.py --worlds "$w," --seeds 2 --device "$DEVICE" --threads "$THREADS" \
    --out "$WORK/held" --no-progress "${extra[@]}" > "$WORK/log_world$w.txt" 2>&1 &
  pids+=($!)
done
if [ "${TUNING:-1}" = 1 ]; then
  timeout "$LIMIT" python3 examples/quickstart.py --seeds 2 --device "$DEVICE" --threads "$THREADS" \
    --out "$WORK/world0" --no-progress > "$WORK/log_world0.txt" 2>&1 &
  pids+=($!)
fi
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "all runs ended after $(( $(date +%s) - started )) s (last non-zero exit status: $status)"
for f in heldout.json heldout.md heldout.png; do cp "$WORK/held/$f" "$DEST/" 2>/dev/null || echo "missing $f"; done
for f in report.png report.html report.json; do cp "$WORK/held/report/$f" "$DEST/" 2>/dev/null || echo "missing $f"; done
(cd "$WORK" && tar czf "$DEST/runs.tar.gz" held/world*/results.json world0/results.json world0/results.md \
  world0/report log_world*.txt 2>/dev/null)
cat "$WORK"/log_world*.txt > "$DEST/log.txt"
cat "$WORK/held/heldout.md" 2>/dev/null
grep -h "done in\|total \|Rmean vs baseline" "$WORK"/log_world*.txt
exit $status
