"""Benchmark: bank_contrastive_loss (backend="auto") vs the full-logits reference.

For each (N, D, B) and implementation, a fresh subprocess builds a bf16-free float32 bank (N, D),
a float32 query (B, D) that requires grad, and a learnable temperature, then measures:

* peak extra memory of one forward + backward, measured on the first (cold) call:
  - CPU: torch's CPU allocator is not seen by tracemalloc, so we read the kernel's resident-set
    counters. After the inputs exist, the process's peak RSS (VmHWM) is reset by writing "5" to
    /proc/self/clear_refs; extra = VmHWM after the call - VmRSS before it. A fresh process per
    measurement means no memory cached from earlier configurations is counted as free.
  - CUDA: torch.cuda.reset_peak_memory_stats(); extra = max_memory_allocated - memory_allocated.
* time of forward + backward: median of --repeats warm calls (CUDA: synchronised).
* path: the backend ``select_backend`` picks for the library ("torch" or "triton"; tables recorded before
  the one loss entry point say "chunked" / "fused"), "full" for the reference.

Rounds interleave the reference and the library subprocesses (every variant once per round, in
turn) so that load from other users of a shared machine hits all alike; the table shows the median
over rounds, and the 1-minute load average read before each subprocess (min / median / max) is
stored and printed, since on a shared box the load decides how far a ratio can be trusted.
``--chunk-budgets`` adds one library variant per CHUNK_BUDGET_BYTES value (the chunk-size choice).

    python benchmarks/bank_loss.py --quick --out benchmarks/bank_loss_quick.json
    python benchmarks/bank_loss.py --configs 500000x256x128 --rounds 5 --out bench.json
    python benchmarks/bank_loss.py --device cpu --configs 500000x256x128 --rounds 4 \
        --chunk-budgets 4194304 16777216 67108864 --out benchmarks/bank_loss_cpu_500k.json
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
    from cir_plugins.negatives import core
    from cir_plugins.negatives import loss as L

    if args.chunk_budget:
        core.CHUNK_BUDGET_BYTES = args.chunk_budget  # read by default_chunk_size at call time
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
    path = "full" if args.impl == "naive" else L.select_backend(query, bank, "dot")

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
            "threads": torch.get_num_threads(), "chunk_budget": core.CHUNK_BUDGET_BYTES}


def run_child(base_args, impl, n, d, b, budget=0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl, "--n", str(n), "--d", str(d),
           "--b", str(b), "--device", base_args.device, "--repeats", str(base_args.repeats),
           "--bank-dtype", base_args.bank_dtype]
    if budget:
        cmd += ["--chunk-budget", str(budget)]
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"impl": impl, "n": n, "d": d, "b": b, "load1": load, "error": done.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), load1=load)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="the goal configuration and two small ones only")
    parser.add_argument("--configs", nargs="*", default=None, help="NxDxB triples, e.g. 500000x256x128")
    parser.add_argument("--rounds", type=int, default=3, help="alternating subprocess rounds per config")
    parser.add_argument("--repeats", type=int, default=3, help="timed warm calls per subprocess")
    parser.add_argument("--bank-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunk-budget", type=int, default=0, help="override CHUNK_BUDGET_BYTES (tuning)")
    parser.add_argument("--chunk-budgets", type=int, nargs="*", default=None,
                        help="one library variant per CHUNK_BUDGET_BYTES value, interleaved with the others")
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
    # variants: (label, impl, chunk budget); every variant runs once per round, in turn
    variants = [("naive", "naive", 0)] if "naive" in args.impls else []
    if "library" in args.impls:
        budgets = args.chunk_budgets or [args.chunk_budget]
        variants += [(f"library@{x >> 20}MiB" if x else "library", "library", x) for x in budgets]
    rows = []
    header = f"{'N':>9} {'D':>4} {'B':>4} {'variant':>16} | {'median s':>8} {'t ratio':>7} | {'peak MB':>8} " \
             f"{'m ratio':>7} | load1 min/med/max | path"
    print(header)
    print("-" * len(header))
    for n, d, b in configs:
        runs = {label: [] for label, _, _ in variants}
        for _ in range(args.rounds):
            for label, impl, budget in variants:
                runs[label].append(run_child(args, impl, n, d, b, budget))
        summary = {"n": n, "d": d, "b": b, "runs": runs}
        for label, _, _ in variants:
            ok = [r for r in runs[label] if "error" not in r]
            summary[label] = None if not ok else {
                "median_s": statistics.median(r["median_s"] for r in ok),
                "peak_extra_mb": statistics.median(r["peak_extra_bytes"] for r in ok) / 2**20,
                "path": ok[0]["path"], "chunk_budget": ok[0]["chunk_budget"]}
        rows.append(summary)
        base = summary.get("naive")
        loads = sorted(r["load1"] for v in runs.values() for r in v)
        load_cell = f"{loads[0]:.1f}/{statistics.median(loads):.1f}/{loads[-1]:.1f}"
        summary["load1"] = {"min": loads[0], "median": statistics.median(loads), "max": loads[-1]}
        for label, _, _ in variants:
            x = summary[label]
            if x is None:
                print(f"{n:>9} {d:>4} {b:>4} {label:>16} | every run failed (see the JSON)", flush=True)
                continue
            t_ratio = f"{x['median_s'] / base['median_s']:.2f}" if base else "-"
            m_ratio = f"{x['peak_extra_mb'] / base['peak_extra_mb']:.3f}" if base and base["peak_extra_mb"] else "-"
            print(f"{n:>9} {d:>4} {b:>4} {label:>16} | {x['median_s']:8.3f} {t_ratio:>7} | {x['peak_extra_mb']:8.1f} "
                  f"{m_ratio:>7} | {load_cell:>17} | {x['path']}", flush=True)
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
