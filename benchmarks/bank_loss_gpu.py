"""GPU benchmark of the bank loss (forward + backward): naive fp32, naive bf16, chunked, fused.

One command runs the whole table on one GPU (aimed at under 5 minutes; configurations that
cannot fit in memory are skipped with a note, and a --max-seconds budget skips the rest):

    python benchmarks/bank_loss_gpu.py --out benchmarks/bank_loss_gpu.json

CPU smoke run (tiny sizes, fused rows skipped: they need CUDA), used by the tests:

    python benchmarks/bank_loss_gpu.py --smoke --device cpu --out /tmp/bank_loss_gpu_smoke.json

Methods (query float32, requires grad; learnable temperature; 2 exclusions per query):
  naive_fp32  full (B, N) float32 logits over a float32 copy of the bank, F.cross_entropy
  naive_bf16  full (B, N) bf16 logits over the bf16 bank, F.cross_entropy
  chunked     cir_plugins bank_contrastive_loss(..., backend="torch") with chunk_size forced
  fused       bank_contrastive_loss(..., backend="triton") (the Triton kernel), precision="exact"
  fused_fast  the same kernel, precision="fast" (query and softmax weights rounded to bf16)
  fused_two_pass  precision="two_pass" (issue 20): pass 1 the kernel without the gradient accumulator,
              pass 2 bf16 softmax weights chunk by chunk + one cuBLAS GEMM each; --two-pass-tiles adds
              rows fused_two_pass:<settings> with other pass-2 tiles / chunk sizes
  cce         Apple's cut-cross-entropy linear_cross_entropy (its default gradient filter), only when
              named in --methods and the package imports: query / tau in bf16 against the bank; it has
              no row exclusions, so it solves a slightly easier problem (its loss differs by that).
              Run it in its own process (--grid must --methods chunked,cce,cce_exact): a crash inside
              it (seen with 25.1.1 on torch 2.11 / triton 3.6) poisons the process's CUDA context
  cce_exact   the same with filter_eps=None (no gradient filtering)
Multi-vector rows (bank (N, T, D), max over T) run the same methods with similarity="max_token".
(The method labels chunked / fused name the torch / triton backends; they are kept so that the rows compare
with the tables already recorded.)

Columns: ms (median of CUDA-event timed iterations after warm-up), floor_ms = max(FLOPs / peak
matmul rate, bank bytes / peak bandwidth) with FLOPs = 2 matmuls (logits and the query gradient)
of 2*B*N*T*D each and bank bytes = N*T*D*2 (bf16 read once), x_floor = ms / floor_ms, extra_GB =
torch.cuda.max_memory_allocated delta over the inputs during one forward + backward, rel_vs_chunked
= |loss - chunked loss| / chunked loss. Accuracy against float64 (--accuracy, default on): the same
loss and gradients with a float64 query and temperature through the library's chunked torch backend
(float64 products over the same bf16 bank values): loss_rel_f64, dq_rel_f64 (max |dq - dq64| /
max |dq64|), dtau_rel_f64. Peaks: --peak-tflops / --peak-gbps; default: the H200
figures of the issue (740 TFLOP/s bf16, 4200 GB/s) on an H200, measured on the device otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import record_header, write_json  # noqa: E402

from cir_plugins.negatives import core  # noqa: E402
from cir_plugins.negatives import loss as L  # noqa: E402

H200_TFLOPS = 740.0
H200_GBPS = 4200.0
DOT_METHODS = ("naive_fp32", "naive_bf16", "chunked", "fused", "fused_fast", "fused_two_pass", "cce", "cce_exact")
DEFAULT_METHODS = ("naive_fp32", "naive_bf16", "chunked", "fused", "fused_fast", "fused_two_pass")  # cce when asked
MULTI_METHODS = ("naive_fp32", "naive_bf16", "chunked", "fused", "fused_fast", "fused_two_pass")
FUSED_PRECISION = {"fused": "exact", "fused_fast": "fast", "fused_two_pass": "two_pass"}


def parse_two_pass_variants(spec):
    """'BLOCK_N=64,num_warps=4;chunk_mb=128' -> [{'BLOCK_N': 64, 'num_warps': 4}, {'chunk_mb': 128}]."""
    variants = []
    for part in filter(None, (spec or "").split(";")):
        variants.append({k.strip(): int(v) for k, v in (kv.split("=") for kv in part.split(","))})
    return variants


def with_two_pass_variant(variant, fn):
    """Run fn with pass 2's tiles (bank_partials' weight_tiles), chunk bytes (chunk_mb) and GEMM slice
    (gemm_slice columns, 0 = one GEMM) of precision two_pass overridden."""
    from cir_plugins.negatives import fused

    saved = fused.bank_partials, fused.TWO_PASS_CHUNK_BYTES, fused.TWO_PASS_GEMM_SLICE
    tiles = {k: v for k, v in variant.items() if k not in ("chunk_mb", "gemm_slice")}
    if tiles:  # the loss calls fused.bank_partials: hand it the pass-2 tiles
        fused.bank_partials = lambda *a, **k: saved[0](*a, **k, weight_tiles=tiles)
    if "chunk_mb" in variant:
        fused.TWO_PASS_CHUNK_BYTES = variant["chunk_mb"] << 20
    if "gemm_slice" in variant:
        fused.TWO_PASS_GEMM_SLICE = variant["gemm_slice"]
    try:
        return fn()
    finally:
        fused.bank_partials, fused.TWO_PASS_CHUNK_BYTES, fused.TWO_PASS_GEMM_SLICE = saved


def float64_reference(query0, bank, target, tau_value, excl, similarity):
    """Loss, dq, dtau with a float64 query and temperature over the same bank values (torch backend, chunked)."""
    q = query0.double().requires_grad_(True)
    tau = torch.tensor(tau_value, dtype=torch.float64, device=q.device, requires_grad=True)
    t = bank.shape[1] if bank.dim() == 3 else 1
    loss = L.bank_contrastive_loss(q, bank, target, tau, exclude_rows=excl, similarity=similarity, backend="torch",
                                   chunk_size=core.default_chunk_size(q.shape[0], t))
    loss.backward()
    return float(loss.detach()), q.grad, tau.grad


def full_grid():
    """(kind, N, B, D, T) for the full GPU table; the issue's must-show shapes first, so a time budget
    spent early still leaves them measured."""
    grid = [("single", 1_000_000, 256, 768, 1), ("single", 10_000_000, 256, 768, 1)]
    for n in (100_000, 1_000_000, 10_000_000):
        for d in (256, 768):
            for b in (32, 256, 1024):
                if ("single", n, b, d, 1) not in grid:
                    grid.append(("single", n, b, d, 1))
    for n in (100_000, 1_000_000):
        for b in (32, 256):
            grid.append(("multi", n, b, 256, 32))
    return grid


def smoke_grid():
    return [("single", 1003, 5, 40, 1), ("single", 4099, 17, 64, 1), ("multi", 301, 5, 16, 4)]


def make_bank(n, t, d, device, dtype, seed=0):
    """Unit rows (N, D) or (N, T, D) in ``dtype``, generated in slices to avoid a float32 copy."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (n, d) if t == 1 else (n, t, d)
    bank = torch.empty(shape, device=device, dtype=dtype)
    step = max(1, (1 << 26) // (t * d))
    for s in range(0, n, step):
        e = min(n, s + step)
        part = torch.randn((e - s, *shape[1:]), device=device, generator=g)
        bank[s:e] = F.normalize(part, dim=-1).to(dtype)
    return bank


def naive_loss(query, bank, target, tau, excl, similarity, dtype):
    """Full logits in ``dtype``: (B, D) @ (D, N) or max over T of (B, D) @ (D, N*T)."""
    q = query.to(dtype)
    if similarity == "dot":
        sims = q @ bank.T  # (B, N)
    else:
        n, t, d = bank.shape
        sims = (q @ bank.reshape(n * t, d).T).view(q.shape[0], n, t).amax(2)  # (B, N*T) -> (B, N)
    logits = sims / tau.to(dtype)
    rows = torch.arange(q.shape[0], device=q.device)[:, None].expand_as(excl)
    keep = excl >= 0
    logits = logits.index_put((rows[keep], excl[keep]), torch.tensor(float("-inf"), dtype=dtype, device=q.device))
    return F.cross_entropy(logits, target)


def estimate_bytes(method, n, b, d, t):
    """Rough peak extra bytes, used only to skip configurations that cannot fit."""
    if method == "naive_fp32":
        return n * t * d * 4 + 4 * b * n * t * 4
    if method == "naive_bf16":
        return 5 * b * n * t * 2 + 2 * b * n * 4
    return 256 << 20


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def measure_peaks(device):
    """(TFLOP/s of a bf16 matmul, GB/s of a device copy counting read + write), measured."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    timer = Timer(device)
    for _ in range(3):
        a @ a
    ms = min(timer(lambda: a @ a) for _ in range(10))
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    x = torch.empty(1 << 29, device=device, dtype=torch.uint8)  # 512 MB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ms = min(timer(lambda: y.copy_(x)) for _ in range(10))
    gbps = 2 * x.numel() / (ms * 1e-3) / 1e9
    a = x = y = None  # release the device memory (the timed lambdas share these names)
    return tflops, gbps


def run_config(kind, n, b, d, t, methods, device, args, timer, bank_cache):
    similarity = "dot" if kind == "single" else "max_token"
    key = (n, d, t)
    if bank_cache.get("key") != key:
        bank_cache.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bank_cache["bank"] = make_bank(n, t, d, device, torch.bfloat16)
        bank_cache["key"] = key
    bank = bank_cache["bank"]
    g = torch.Generator(device=device).manual_seed(1)
    query0 = F.normalize(torch.randn(b, d, device=device, generator=g), dim=-1)
    target = torch.randint(0, n, (b,), device=device, generator=g)
    excl = torch.randint(0, n, (b, 2), device=device, generator=g)
    excl[excl == target[:, None]] = -1
    ref64 = float64_reference(query0, bank, target, 0.05, excl, similarity) if args.accuracy else None
    flops = 2 * (2 * b * n * t * d)
    floor_ms = max(flops / (args.peak_tflops * 1e12), n * t * d * 2 / (args.peak_gbps * 1e9)) * 1e3
    rows = []
    for method in methods:
        variant = {}
        if ":" in method:  # fused_two_pass:<settings>
            variant = parse_two_pass_variants(method.split(":", 1)[1])[0]
        row = dict(kind=kind, N=n, B=b, D=d, T=t, method=method, floor_ms=floor_ms)
        if time.perf_counter() - args.t_start > args.max_seconds:
            row["note"] = f"skipped: time budget {args.max_seconds}s spent"
            rows.append(row)
            continue
        if method.startswith("cce"):
            try:
                from cut_cross_entropy import linear_cross_entropy
            except Exception as exc:  # not installed, or broken against this torch / triton
                row["note"] = f"skipped: cut_cross_entropy does not import ({type(exc).__name__})"
                rows.append(row)
                continue
            if device.type != "cuda" or similarity != "dot":
                row["note"] = "skipped: cce needs CUDA and one vector per row"
                rows.append(row)
                continue
        if method.startswith("fused"):
            from cir_plugins.negatives import fused

            if not fused.fused_available(query0, bank, similarity):
                row["note"] = "skipped: fused needs a CUDA device and triton"
                rows.append(row)
                continue
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info()
            need = estimate_bytes(method, n, b, d, t)
            if need > 0.85 * free:
                row["note"] = f"skipped: needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
                rows.append(row)
                continue
        inputs = bank.float() if method == "naive_fp32" else bank
        query = query0.clone().requires_grad_(True)
        tau = torch.tensor(0.05, device=device, requires_grad=True)
        box = {}

        def step():
            if method == "naive_fp32":
                out = naive_loss(query, inputs, target, tau, excl, similarity, torch.float32)
            elif method == "naive_bf16":
                out = naive_loss(query, inputs, target, tau, excl, similarity, torch.bfloat16)
            elif method == "chunked":
                chunk = core.default_chunk_size(b, t)
                out = L.bank_contrastive_loss(query, inputs, target, tau, exclude_rows=excl, similarity=similarity,
                                              backend="torch", chunk_size=chunk)
            elif method.startswith("cce"):
                extra = {} if method == "cce" else {"filter_eps": None}
                out = linear_cross_entropy((query / tau).to(torch.bfloat16), inputs, target, **extra)
            else:
                precision = FUSED_PRECISION[method.split(":")[0]]
                out = with_two_pass_variant(variant, lambda: L.bank_contrastive_loss(
                    query, inputs, target, tau, exclude_rows=excl, similarity=similarity, backend="triton",
                    precision=precision))
            out.backward()
            box["loss"], box["dq"], box["dtau"] = out.detach(), query.grad, tau.grad
            query.grad = None
            tau.grad = None

        try:
            for _ in range(args.warmup):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                row["extra_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
            times = []
            t0 = time.perf_counter()
            while len(times) < args.min_iters or (time.perf_counter() - t0 < args.min_seconds and len(times) < 50):
                times.append(timer(step))
            row["ms"] = statistics.median(times)
            row["iters"] = len(times)
            row["x_floor"] = row["ms"] / floor_ms
            row["loss"] = float(box["loss"])
            if ref64 is not None:
                loss64, dq64, dtau64 = ref64
                row["loss_rel_f64"] = abs(row["loss"] - loss64) / abs(loss64)
                row["dq_rel_f64"] = float((box["dq"].double() - dq64).abs().max() / dq64.abs().max())
                row["dtau_rel_f64"] = float((box["dtau"].double() - dtau64).abs() / dtau64.abs())
        except torch.OutOfMemoryError:
            row["note"] = "skipped: out of memory"
        finally:
            inputs = query = tau = box = None  # release them (step's closure too) before empty_cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    ref = next((r.get("loss") for r in rows if r["method"] == "chunked" and "loss" in r), None)
    for r in rows:
        if ref is not None and "loss" in r:
            r["rel_vs_chunked"] = abs(r["loss"] - ref) / abs(ref)
    if ref64 is not None:
        del ref64
    return rows


def fmt(v, spec):
    return "-".rjust(int(spec.split(".")[0])) if v is None else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (runs on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 matmul peak for the floor")
    p.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth for the floor")
    p.add_argument("--max-seconds", type=float, default=270.0, help="skip what is left after this")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-iters", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.2)
    p.add_argument("--methods", default=None,
                   help="comma list; default " + ",".join(DEFAULT_METHODS) + " (cce, cce_exact only when named)")
    p.add_argument("--grid", choices=("full", "must"), default="full",
                   help="must: only the issue's two must-show shapes (B=256, D=768, N=1M and 10M)")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="compare each row's loss and gradients with a float64 reference")
    p.add_argument("--two-pass-tiles", default="",
                   help="extra fused_two_pass rows, ';'-separated settings of pass 2: BLOCK_B, BLOCK_N, BLOCK_K, "
                        "num_warps, num_stages, chunk_mb, gemm_slice (e.g. 'BLOCK_N=64;chunk_mb=256;gemm_slice=0')")
    p.add_argument("--out", default="benchmarks/bank_loss_gpu.json")
    args = p.parse_args(argv)
    args.t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --smoke", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak_source = "flags"
    if args.peak_tflops is None or args.peak_gbps is None:
        if device.type == "cuda" and "H200" not in name:
            tf, gb = measure_peaks(device)
            peak_source = "measured on this device"
        else:
            tf, gb = H200_TFLOPS, H200_GBPS
            peak_source = "H200 figures from the issue"
        args.peak_tflops = args.peak_tflops or tf
        args.peak_gbps = args.peak_gbps or gb
    if args.smoke:
        args.warmup, args.min_iters, args.min_seconds = 1, 1, 0.0
    grid = smoke_grid() if args.smoke else (full_grid()[:2] if args.grid == "must" else full_grid())
    pick = set(args.methods.split(",")) if args.methods else set(DEFAULT_METHODS)
    extra = [f"fused_two_pass:{part}" for part in filter(None, args.two_pass_tiles.split(";"))]
    timer = Timer(device)
    rows, cache = [], {}
    for kind, n, b, d, t in grid:
        methods = [m for m in (DOT_METHODS if kind == "single" else MULTI_METHODS) if m in pick] + extra
        rows.extend(run_config(kind, n, b, d, t, methods, device, args, timer, cache))
    cache.clear()

    head = f"{'kind':6} {'N':>9} {'B':>5} {'D':>4} {'T':>3} {'method':14} {'ms':>9} {'floor':>7} {'x_floor':>7} " \
           f"{'extra_GB':>8} {'rel_vs_ch':>9} {'loss_f64':>8} {'dq_f64':>8}  note"
    print(f"device: {name}; peaks {args.peak_tflops:.0f} TFLOP/s, {args.peak_gbps:.0f} GB/s ({peak_source})")
    print(head)
    for r in rows:
        print(f"{r['kind']:6} {r['N']:>9} {r['B']:>5} {r['D']:>4} {r['T']:>3} {r['method']:14} "
              f"{fmt(r.get('ms'), '9.3f')} {r['floor_ms']:7.3f} {fmt(r.get('x_floor'), '7.2f')} "
              f"{fmt(r.get('extra_GB'), '8.3f')} {fmt(r.get('rel_vs_chunked'), '9.1e')} "
              f"{fmt(r.get('loss_rel_f64'), '8.1e')} {fmt(r.get('dq_rel_f64'), '8.1e')}  {r.get('note', '')}")
    out = dict(
        **record_header("bank_loss_gpu"),
        device=name,
        torch=torch.__version__,
        peak_tflops=args.peak_tflops,
        peak_gbps=args.peak_gbps,
        peak_source=peak_source,
        seconds=time.perf_counter() - args.t_start,
        rows=rows,
    )
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
