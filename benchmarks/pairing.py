"""Benchmark the rank-window pairing: time and peak RSS at N images, D dims.

Usage: python benchmarks/pairing.py [--n 50000] [--dim 256] [--window 10000,15000] [--chunk 512]
       [--threads 2] [--json benchmarks/pairing.json]

Prints a table and writes JSON. Peak RSS is the process's ru_maxrss (includes the Python/torch
baseline, measured before the run and reported separately).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cir_plugins.positives.pairing import select_partners  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB -> MiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--window", default="10000,15000")
    parser.add_argument("--partners", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/pairing.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    embeddings = torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(0))
    baseline = peak_rss_mb()
    start = time.perf_counter()
    picks = select_partners(embeddings, rank_window=args.window, partners_per_image=args.partners,
                            seed=0, chunk_size=args.chunk)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    drawn = sum(len(p) for p in picks)
    row = {
        "n": args.n, "dim": args.dim, "window": args.window, "partners": args.partners, "chunk": args.chunk,
        "threads": args.threads, "seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(baseline, 1), "partners_drawn": drawn,
        "full_matrix_mb_avoided": round(args.n * args.n * 4 / 2**20, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(f"{'N':>7} {'D':>5} {'window':>13} {'chunk':>6} {'seconds':>8} {'peak RSS MB':>12} {'baseline MB':>12}")
    print(f"{row['n']:>7} {row['dim']:>5} {row['window']:>13} {row['chunk']:>6} {row['seconds']:>8} "
          f"{row['peak_rss_mb']:>12} {row['baseline_rss_mb']:>12}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
