"""Tile-size sweep of the fused bank-loss kernel on one GPU, every setting checked against a reference.

For one shape (default the issue's B=256, D=768, N=1M over a bf16 bank) it runs the kernel's softmax
statistics (one pass over the bank, query-gradient accumulator on: the whole cost of forward +
backward) under each tile setting and both precisions, and reports:

  ms        median CUDA-event time of cir_plugins.negatives.fused.bank_partials (the statistics of
            bank_contrastive_loss(..., backend="triton"))
  x_floor   ms over the floor (the larger of 2 matmuls' FLOPs over the bf16 peak and the bank's bytes
            over the bandwidth; the same floor as benchmarks/bank_loss_gpu.py)
  lse_rel   max |logsumexp - reference| / max |reference|
  eb_rel    max |E_p[b] - reference| / max |reference|  (the query gradient's bank term)

The reference is the library's float32 chunked PyTorch backend (``core.torch_bank_stats``) over the
same bf16 bank values, on inputs checked by ``validate_loss_inputs``. Each row also records the launch
the setting resolved to (tiles, grid), read from the kernel's launches. A setting that fails to compile
or run is listed with its error, not dropped.

    python benchmarks/fused_tune.py --out benchmarks/fused_tune_gpu.json

CPU smoke run through Triton's interpreter (tiny shape, three settings; proves the script runs):

    TRITON_INTERPRET=1 python benchmarks/fused_tune.py --smoke --out /tmp/fused_tune_smoke.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import record_header, write_json  # noqa: E402
from bank_loss_gpu import H200_GBPS, H200_TFLOPS, Timer, make_bank, measure_peaks  # noqa: E402

from cir_plugins.negatives import fused  # noqa: E402
from cir_plugins.negatives.core import torch_bank_stats  # noqa: E402
from cir_plugins.negatives.loss import validate_loss_inputs  # noqa: E402


def settings(smoke=False):
    """Tile settings to try, the built-in choice first."""
    out = [None]
    if smoke:
        return out + [dict(BLOCK_B=16, BLOCK_N=16, BLOCK_K=16, BLOCK_DV=16), dict(BLOCK_DV=32, programs_per_sm=1)]
    for bb, bn, dv, nw in itertools.product((64, 128), (64, 128), (256, 128), (8, 4)):
        out.append(dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=64, BLOCK_DV=dv, num_warps=nw))
    out += [dict(BLOCK_K=128), dict(BLOCK_K=32), dict(num_stages=2), dict(num_stages=4),
            dict(programs_per_sm=2), dict(programs_per_sm=8), dict(BLOCK_DV=512, num_warps=8),
            dict(BLOCK_B=128, BLOCK_DV=512, num_warps=8)]
    return out


def reference_stats(query, bank, tau, excl, chunk):
    """float32 logsumexp and E_p[b] from the library's torch backend of the one statistics core."""
    st = torch_bank_stats(query, bank, tau, excl, "dot", chunk_size=chunk)
    return st.m + torch.log(st.z), st.w / st.z[:, None]


class LaunchRecorder:
    """Wraps fused.bank_partials_kernel while a setting runs: keeps the first launch's tiles and grid."""

    KEYS = ("BLOCK_B", "BLOCK_N", "BLOCK_K", "BLOCK_DV", "NUM_DV", "num_warps", "num_stages")

    def __init__(self):
        self.config = None
        self.kernel = fused.bank_partials_kernel

    def __getitem__(self, grid):
        def launch(*args, **meta):
            if self.config is None:
                self.config = {k: meta[k] for k in self.KEYS if k in meta}
                self.config.update(num_qb=grid[0] // meta["NUM_DV"], splits=grid[1], tiles_per_split=args[13])
            return self.kernel[grid](*args, **meta)
        return launch

    def __enter__(self):
        fused.bank_partials_kernel = self
        return self

    def __exit__(self, *exc):
        fused.bank_partials_kernel = self.kernel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--N", type=int, default=1_000_000)
    p.add_argument("--precisions", default="exact,fast")
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape (needs TRITON_INTERPRET=1)")
    p.add_argument("--out", default="benchmarks/fused_tune_gpu.json")
    args = p.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("--smoke runs the kernel through Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        args.B, args.D, args.N = 19, 24, 203
    elif not torch.cuda.is_available():
        print("fused_tune needs a CUDA device (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "cpu (Triton interpreter)" if args.smoke else torch.cuda.get_device_name(device)
    if args.smoke or "H200" in name:
        tf, gb, source = H200_TFLOPS, H200_GBPS, "H200 figures from the issue"
    else:
        (tf, gb), source = measure_peaks(device), "measured on this device"
    b, d, n = args.B, args.D, args.N
    floor_ms = max(2 * 2 * b * n * d / (tf * 1e12), n * d * 2 / (gb * 1e9)) * 1e3
    bank = make_bank(n, 1, d, device, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(1)
    query = F.normalize(torch.randn(b, d, device=device, generator=g), dim=-1)
    excl = torch.randint(0, n, (b, 2), device=device, generator=g)
    target = torch.randint(0, n, (b,), device=device, generator=g)
    excl[excl == target[:, None]] = -1  # a query never excludes its target
    tau = validate_loss_inputs(query, bank, target, torch.tensor(0.05, device=device), excl, "dot")
    ref_lse, ref_eb = reference_stats(query, bank, tau, excl, chunk=300 if args.smoke else 65536)
    timer = Timer(device)
    rows = []
    for tiles, precision in itertools.product(settings(args.smoke), args.precisions.split(",")):
        row = dict(tiles=tiles or "built-in", precision=precision)
        rows.append(row)
        if time.perf_counter() - t_start > args.max_seconds:
            row["note"] = f"skipped: time budget {args.max_seconds}s spent"
            continue
        launches = LaunchRecorder()
        try:
            def step():
                return fused.bank_partials(query, bank, tau, excl, precision=precision, tiles=tiles)

            with launches:
                st = step()
            row["config"] = launches.config
            if device.type == "cuda":
                torch.cuda.synchronize()
            lse, eb = st.m + torch.log(st.z), st.w / st.z[:, None]
            row["lse_rel"] = float((lse - ref_lse).abs().max() / ref_lse.abs().max())
            row["eb_rel"] = float((eb - ref_eb).abs().max() / ref_eb.abs().max())
            times = [timer(step) for _ in range(1 if args.smoke else 5)]
            row["ms"] = statistics.median(times)
            row["x_floor"] = row["ms"] / floor_ms
        except Exception as exc:  # a setting Triton cannot build or run on this device
            row["config"] = launches.config  # None when the tiles were refused before any launch
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    print(f"device: {name}; B={b} D={d} N={n} bf16 bank; floor {floor_ms:.3f} ms (peaks {tf:.0f} TFLOP/s, "
          f"{gb:.0f} GB/s, {source})")
    print(f"{'precision':9} {'ms':>8} {'x_floor':>7} {'lse_rel':>8} {'eb_rel':>8}  tiles / note")
    for r in sorted(rows, key=lambda r: (r["precision"], r.get("ms", float("inf")))):
        ms = f"{r['ms']:8.3f} {r['x_floor']:7.2f} {r['lse_rel']:8.1e} {r['eb_rel']:8.1e}" if "ms" in r else " " * 35
        print(f"{r['precision']:9} {ms}  {r['tiles']} {r.get('note', '')}")
    best = {}
    for prec in args.precisions.split(","):
        ok = [r for r in rows if r["precision"] == prec and "ms" in r]
        if ok:
            best[prec] = min(ok, key=lambda r: r["ms"])
    out = dict(**record_header("fused_tune"), device=name, torch=torch.__version__, B=b, D=d, N=n,
               floor_ms=floor_ms, peak_tflops=tf, peak_gbps=gb, peak_source=source,
               seconds=time.perf_counter() - t_start, best=best, rows=rows)
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
