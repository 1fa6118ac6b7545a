"""Cost of the training loop's non-finite-gradient guard against the optimiser step it protects.

Before every optimiser step (without a GradScaler) the trainer checks that every trainable
gradient is finite (``Trainer._check_gradients``: one isfinite-all per tensor, stacked, one
host sync). This script times that exact method and ``torch.optim.AdamW.step`` over parameter sets
shaped like a small and a base text tower, and prints the guard's share of (guard + step).

    python benchmarks/reliability_overhead.py --repeats 5 --out benchmarks/reliability_overhead.json

Prints a table and writes JSON (machine, torch version, settings, median seconds, ratio).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_plugins.training.loop import Trainer  # noqa: E402

# (label, number of tensors, parameters per tensor): ~ a 4-layer width-256 tower and a CLIP B text tower
SHAPES = [("small text tower (3.2M)", 50, 64_000), ("CLIP-B text tower (63M)", 200, 315_000)]


def _params(count: int, size: int, device: torch.device) -> list[tuple[str, torch.nn.Parameter]]:
    named = []
    for k in range(count):
        p = torch.nn.Parameter(torch.randn(size, device=device))
        p.grad = torch.randn(size, device=device)
        named.append((f"layer{k}.weight", p))
    return named


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for label, count, size in SHAPES:
        named = _params(count, size, device)
        optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-5)
        fake = SimpleNamespace(trainable=named, log_tau=None, optimizer=optimizer)

        def guard():
            Trainer._check_gradients(fake)

        def step():
            optimizer.step()  # gradients stay in place: the same work every repeat

        guard_s = _median_seconds(guard, args.repeats, device)
        step_s = _median_seconds(step, args.repeats, device)
        rows.append({"params": label, "tensors": count, "numel": count * size, "guard_s": guard_s,
                     "adamw_step_s": step_s, "guard_share": guard_s / (guard_s + step_s)})
    print(f"{'parameters':<26}{'guard ms':>10}{'AdamW step ms':>15}{'guard share':>13}")
    for row in rows:
        print(f"{row['params']:<26}{row['guard_s'] * 1e3:>10.2f}{row['adamw_step_s'] * 1e3:>15.2f}"
              f"{row['guard_share'] * 100:>12.1f}%")
    if args.out:
        document = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
                    "processor": platform.processor(), "torch": torch.__version__, "device": str(device),
                    "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows,
                    "command": " ".join(["python"] + sys.argv)}
        Path(args.out).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
