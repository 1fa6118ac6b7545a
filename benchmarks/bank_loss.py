"""Benchmark: bank_contrastive_loss (automatic path) vs the full-logits reference.

For each (N, D, B) and implementation, a fresh subprocess builds a bf16-free float32 bank (N, D),
a float32 query (B, D) that requires grad, and a learnable temperature, then measures:

* peak extra memory of one forward + backward, measured on the first (cold) call:
  - CPU: torch's CPU allocator is not seen by tracemalloc, so we read the kernel's resident-set
    counters. After the inputs exist, the process's peak RSS (VmHWM) is reset by writing "5" to
    /proc/self/clear_refs; extra = VmHWM after the call - VmRSS before it. A fresh process per
    measurement means no memory cached from earlier configurations is counted as free.
  - CUDA: torch.cuda.reset_peak_memory_stats(); extra = max_memory_allocated - memory_allocated.
* time of forward + backward: median of --repeats warm calls (CUDA: synchronised).

Rounds alternate reference and library subprocesses so that load from other users of a shared
machine hits both alike; the table shows the median over rounds.

    python benchmarks/bank_loss.py --quick --out benchmarks/bank_loss_quick.json
    python benchmarks/bank_loss.py --configs 500000x256x128 --rounds 5 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

IMPLS = ("naive", "library")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    """Run one (impl, N, D, B) measurement in this process; return a dict."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from cir_plugins.negatives import loss as L

    if args.chunk_budget:
        L.CHUNK_BUDGET_BYTES = args.chunk_budget
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, d, b = args.n, args.d, args.b
    bank = torch.randn(n, d, device=device, dtype=getattr(torch, args.bank_dtype))
    bank /= bank.float().norm(dim=1, keepdim=True).to(bank.dtype)  # unit rows, in place
    query = torch.nn.functional.normalize(torch.randn(b, d, device=device), dim=1).requires_grad_(True)
    tau = torch.tensor(0.05, device=device, requires_grad=True)
    target = torch.randint(0, n, (b,), device=device)
    exclude = torch.randint(0, n, (b, 1), device=device)
    exclude[exclude == target[:, None]] = -1
    fn = L.naive_bank_contrastive_loss if args.impl == "naive" else L.bank_contrastive_loss
    path = "full" if args.impl == "naive" else L.select_path(query, bank, "dot")

    def step():
        loss = fn(query, bank, target, tau, exclude_rows=exclude)
        loss.backward()
        query.grad = None
        tau.grad = None
        return loss

    # initialise thread pools and lazy library state on a tiny problem, so that one-time buffers
    # are not charged to either implementation; then measure the first real call
    small = bank[: min(n, 2048)].clone()
    fn(query, small, target % small.shape[0], tau, exclude_rows=None).backward()
    query.grad = None
    tau.grad = None
    del small
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        method = "cuda max_memory_allocated"
    else:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            method = "VmHWM after clear_refs=5"
        except OSError:
            method = "ru_maxrss (peak not resettable; upper bound)"
        base_kib = _status_kib("VmRSS")
        step()
        extra = (_status_kib("VmHWM") - base_kib) * 1024
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"impl": args.impl, "n": n, "d": d, "b": b, "path": path, "peak_extra_bytes": int(extra),
            "memory_method": method, "times_s": times, "median_s": statistics.median(times),
            "threads": torch.get_num_threads(), "chunk_budget": L.CHUNK_BUDGET_BYTES}


def run_child(base_args, impl, n, d, b) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl, "--n", str(n), "--d", str(d),
           "--b", str(b), "--device", base_args.device, "--repeats", str(base_args.repeats),
           "--bank-dtype", base_args.bank_dtype]
    if base_args.chunk_budget:
        cmd += ["--chunk-budget", str(base_args.chunk_budget)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"impl": impl, "n": n, "d": d, "b": b, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="the goal configuration and two small ones only")
    parser.add_argument("--configs", nargs="*", default=None, help="NxDxB triples, e.g. 500000x256x128")
    parser.add_argument("--rounds", type=int, default=3, help="alternating subprocess rounds per config")
    parser.add_argument("--repeats", type=int, default=3, help="timed warm calls per subprocess")
    parser.add_argument("--bank-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunk-budget", type=int, default=0, help="override CHUNK_BUDGET_BYTES (tuning)")
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="library", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--b", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(child(args)))
        return 0

    if args.configs:
        configs = [tuple(int(float(v)) for v in c.split("x")) for c in args.configs]
    elif args.quick:
        configs = [(10_000, 256, 32), (100_000, 256, 128), (500_000, 256, 128)]
    else:
        configs = [(n, d, b) for n in (10_000, 100_000, 500_000, 1_000_000) for d in (256, 768) for b in (32, 256)]
        configs.append((500_000, 256, 128))
    rows = []
    header = f"{'N':>9} {'D':>4} {'B':>4} | {'naive s':>8} {'lib s':>8} {'t ratio':>7} | " \
             f"{'naive MB':>9} {'lib MB':>8} {'m ratio':>7} | path"
    print(header)
    print("-" * len(header))
    for n, d, b in configs:
        runs = {impl: [] for impl in args.impls}
        for _ in range(args.rounds):
            for impl in args.impls:
                runs[impl].append(run_child(args, impl, n, d, b))
        summary = {"n": n, "d": d, "b": b, "runs": runs}
        for impl in args.impls:
            ok = [r for r in runs[impl] if "error" not in r]
            summary[impl] = None if not ok else {
                "median_s": statistics.median(r["median_s"] for r in ok),
                "peak_extra_mb": statistics.median(r["peak_extra_bytes"] for r in ok) / 2**20,
                "path": ok[0]["path"]}
        rows.append(summary)
        nv, lb = summary.get("naive"), summary.get("library")

        def cell(x, key, fmt):
            return format(x[key], fmt) if x else "-"  # not requested, or every run failed (see JSON)

        t_ratio = f"{lb['median_s'] / nv['median_s']:.2f}" if nv and lb else "-"
        m_ratio = f"{lb['peak_extra_mb'] / nv['peak_extra_mb']:.3f}" if nv and lb and nv["peak_extra_mb"] else "-"
        print(f"{n:>9} {d:>4} {b:>4} | {cell(nv, 'median_s', '8.3f'):>8} {cell(lb, 'median_s', '8.3f'):>8} "
              f"{t_ratio:>7} | {cell(nv, 'peak_extra_mb', '9.1f'):>9} {cell(lb, 'peak_extra_mb', '8.1f'):>8} "
              f"{m_ratio:>7} | {lb['path'] if lb else '-'}", flush=True)
    if args.out:
        import torch

        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": args.device,
                "machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "argv": sys.argv, "bank_dtype": args.bank_dtype,
                "rounds": args.rounds, "repeats": args.repeats}
        if args.device == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(0)
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
