"""How many torch CPU threads the quickstart should use: 1 vs 2, alone and beside a competing job.

The workload is the quickstart's own hot loop at its own size: tiny-CLIP training steps (batch 256, 36 px images,
32-token texts; examples/_tiny_clip.pretrain_tiny_clip), timed in a fresh process per setting. "Beside a job" runs a
second process with the same loop at torch's default thread count for the whole measurement, as a second
quickstart on the same machine would.

    python benchmarks/threads.py                      # prints the table, writes benchmarks/threads.json
    python benchmarks/threads.py --steps 16 --out /tmp/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import record_header, write_json  # noqa: E402

# one process: set the threads, then time `steps` tiny-CLIP training steps; prints the seconds as JSON
_WORKLOAD = r"""
import json, sys, tempfile, time, torch
threads, steps, loop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "loop"
if threads > 0:
    torch.set_num_threads(threads)
sys.path.insert(0, sys.argv[4])
import _tiny_clip
torch.manual_seed(0)
batch = 256
images = torch.randn(batch * steps, 3, 36, 36)
captions = [f"a {c} {s} at the {p}" for c, s, p in zip(["red", "blue", "green", "cyan"] * (batch * steps),
                                                        ["star", "circle", "cross"] * (batch * steps),
                                                        ["top", "left", "centre", "bottom", "right"] * (batch * steps))]
captions = captions[: batch * steps]
with tempfile.TemporaryDirectory() as out:
    while True:
        started = time.perf_counter()
        _tiny_clip.pretrain_tiny_clip(out + "/clip", images, captions, epochs=1, batch_size=batch, show_progress=False)
        seconds = time.perf_counter() - started
        if not loop:
            print(json.dumps({"threads": torch.get_num_threads(), "seconds": seconds, "per_step": seconds / steps}))
            break
"""


def run_one(threads: int, steps: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _WORKLOAD, str(threads), str(steps), "once", str(ROOT / "examples")],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=2, help="timings per setting (the best is kept)")
    parser.add_argument("--out", default=str(HERE / "threads.json"))
    args = parser.parse_args(argv)
    cores = os.cpu_count()
    record = {**record_header("threads"), "cores": cores, "load_average_at_start": os.getloadavg(), "rows": []}
    for beside in (False, True):
        rival = None
        if beside:  # a second job at torch's default thread count, running the same loop throughout
            rival = subprocess.Popen([sys.executable, "-c", _WORKLOAD, "0", str(args.steps), "loop",
                                      str(ROOT / "examples")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(5)
        try:
            for threads in (1, 2):
                timings = [run_one(threads, args.steps) for _ in range(args.repeats)]
                best = min(timings, key=lambda t: t["per_step"])
                record["rows"].append({"threads": threads, "beside_a_job": beside, "per_step_s": best["per_step"],
                                       "all_per_step_s": [t["per_step"] for t in timings],
                                       "load_average": os.getloadavg()[0]})
        finally:
            if rival is not None:
                rival.kill()
                rival.wait()
    print(f"{'threads':>7} {'beside a job':>13} {'s/step (best)':>14} {'load avg':>9}")
    for row in record["rows"]:
        print(
            f"{row['threads']:>7} {str(row['beside_a_job']):>13} {row['per_step_s']:>14.3f} {row['load_average']:>9.2f}"
        )
    write_json(args.out, record)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
