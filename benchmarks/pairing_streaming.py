"""Streaming partner selection: time and peak RSS, each configuration in a fresh subprocess.

Usage: python benchmarks/pairing_streaming.py [--n 200000] [--compare-n 20000] [--dim 256] [--threads 2]
       [--window 0.590,0.886] [--chunk 256] [--json benchmarks/pairing_streaming.json]

Runs ``select_partners``' two selection paths (numpy per row, the CPU's; torch per block, a GPU's) side by side
at --compare-n (their partners must be identical: the digests of the two outputs are compared), then the numpy
path alone at --n. (Until it replaced the earlier top-b selection, the first row was that selection: the
numbers in benchmarks/RESULTS.md name which.) Random
(N, D) float32 embeddings (seed 0), one partner per image, CPU. Peak RSS is the child's ru_maxrss (the whole
process, Python + torch included); "baseline" is the RSS after the imports and the embeddings. Last, an
ESTIMATE (not a measurement) of N = 1e6 on one H100 from the measured rates and the assumptions printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import record_header, write_json

ROOT = Path(__file__).resolve().parents[1]
# assumptions of the GPU estimate (H100 SXM datasheet figures, and the share of them a kernel reaches)
H100 = {"fp32_tflops": 67.0, "bf16_dense_tflops": 989.0, "hbm_tb_per_s": 3.35, "efficiency": 0.6}
# bytes the torch block path moves per (chunk, N) entry: GEMM write 4, two kthvalue radix selects (16 passes
# of 4 B each) 128, window mask 13, row counts 1, unfused int64 splitmix64 over the row ~224, masked fill 17,
# topk 8
GPU_BYTES_PER_ENTRY = 4 + 128 + 13 + 1 + 224 + 17 + 8


def child(cfg: dict) -> dict:
    """One configuration in this (fresh) process: its time, peak RSS and a digest of the partners."""
    sys.path.insert(0, str(ROOT))
    import torch

    from cir_plugins.positives import pairing

    torch.set_num_threads(cfg["threads"])
    emb = torch.randn(cfg["n"], cfg["dim"], generator=torch.Generator().manual_seed(0))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pairing._NUMPY_ON_CPU = cfg["path"] == "numpy-rows"  # the benchmark's switch between the two paths
    fn = pairing.select_partners
    start, cpu = time.perf_counter(), time.process_time()
    picks = fn(emb, rank_window=tuple(cfg["window"]), partners_per_image=1, seed=0, chunk_size=cfg["chunk"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the score GEMMs' share: 4 blocks timed as the paths compute them, scaled to all blocks
    unit = torch.nn.functional.normalize(emb, dim=1)
    unit_t = unit.t().contiguous()
    probe = time.perf_counter()
    for block in range(4):
        unit[block * cfg["chunk"]:(block + 1) * cfg["chunk"]] @ unit_t
    gemm = (time.perf_counter() - probe) / 4 * -(-cfg["n"] // cfg["chunk"])
    return {**cfg, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "gemm_seconds_est": round(gemm, 1), "peak_rss_mb": round(peak), "baseline_rss_mb": round(baseline),
            "drawn": sum(map(len, picks)), "digest": hashlib.sha256(json.dumps(picks).encode()).hexdigest()[:16]}


def run(cfg: dict) -> dict:
    """``child(cfg)`` in a fresh interpreter (so each peak RSS is its own)."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_estimate(row: dict, n: int = 1_000_000) -> dict:
    """ESTIMATE for ``n`` images on one H100 from a measured streaming row and the H100 assumptions above."""
    entries, dim, eff = n * n, row["dim"], H100["efficiency"]
    scale = entries / row["n"] ** 2  # every pass is linear in the (chunk, N) entries: time grows as N^2
    return {
        "n": n, "assumptions": {**H100, "bytes_per_entry": GPU_BYTES_PER_ENTRY, "chunk": row["chunk"]},
        "cpu_seconds_at_n_same_box": round(row["seconds"] * scale),
        "gemm_flop": 2 * entries * dim,
        "gpu_gemm_fp32_s": round(2 * entries * dim / (H100["fp32_tflops"] * 1e12 * eff), 1),
        "gpu_gemm_bf16_s_not_identical": round(2 * entries * dim / (H100["bf16_dense_tflops"] * 1e12 * eff), 1),
        "gpu_selection_draw_s": round(entries * GPU_BYTES_PER_ENTRY / (H100["hbm_tb_per_s"] * 1e12 * eff)),
        "gpu_block_memory_gb": round(row["chunk"] * n * 40 / 1e9, 1),
        "gpu_embeddings_gb": round(3 * n * dim * 4 / 1e9, 1),
    }


def machine() -> str:
    """CPU model (from /proc/cpuinfo where there is one) and core count."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    return f"{models[0] if models else platform.machine()}, {os.cpu_count()} cores"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--compare-n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", default="0.590,0.886")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--json", default="benchmarks/pairing_streaming.json")
    args = parser.parse_args()
    base = {"dim": args.dim, "threads": args.threads, "chunk": args.chunk,
            "window": [float(v) for v in args.window.split(",")]}
    rows = [run({**base, "path": path, "n": n}) for path, n in
            [("numpy-rows", args.compare_n), ("torch-blocks", args.compare_n), ("numpy-rows", args.n)]]
    equal = rows[0]["digest"] == rows[1]["digest"]
    print(f"{'path':>10} {'N':>8} {'D':>4} {'thr':>3} {'wall s':>7} {'CPU s':>7} {'GEMM s (est)':>12} "
          f"{'peak RSS MB':>11} {'baseline MB':>11} digest")
    for r in rows:
        print(f"{r['path']:>10} {r['n']:>8} {r['dim']:>4} {r['threads']:>3} {r['seconds']:>7} {r['cpu_seconds']:>7} "
              f"{r['gemm_seconds_est']:>12} {r['peak_rss_mb']:>11} {r['baseline_rss_mb']:>11} {r['digest']}")
    print(f"N = {args.compare_n}: partners identical: {equal}")
    estimate = gpu_estimate(rows[-1])
    print("ESTIMATE (not measured), N = 1e6 on one H100:", json.dumps(estimate))
    write_json(args.json, {**record_header("pairing_streaming"), "machine": machine(),
                           "rows": rows, f"identical_at_{args.compare_n}": equal, "estimate_1e6_h100": estimate})
    if not equal:
        print("ERROR: the two paths disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
