"""Retrieval evaluation on the GPU: 4k queries x 1M gallery, top-50 (goal: under 60 ms).

Times the library's chunked evaluation functions on one device:

  topk_rows            cir_plugins.metrics.topk_rows(query, gallery, 50) (default chunking; per chunk the
                       candidate filter: group maxima of metrics.TOPK_GROUP scores, the 50 best groups,
                       one top-k over their scores)
  topk_rows_no_filter  the same with the filter off (metrics.TOPK_GROUP = 0: torch.topk over each whole
                       score block, the previous behaviour); must return identical rows and scores
  topk_rows_group<G>   the filter with groups of G scores (--sweep-groups), same check
  topk_rows_big_chunk  the same with chunk_size=--big-chunk gallery rows per step
  retrieval_metrics    cir_plugins.metrics.retrieval_metrics(ks=(1, 5, 10, 50)) with one excluded row per query
  topk_rows_fp32_upcast  topk_rows with the bf16 tensor-core scoring switched off (each chunk upcast to
                       float32, the CPU path); must return the same rows up to float32 summation order
  bare_bf16_topk       a plain loop in this script, for scale: bf16 (Q, C) score blocks, torch.topk per
                       block, merge of the running top-k (no tie rule); what the hardware does unaided

    python benchmarks/retrieval_gpu.py --out benchmarks/retrieval_gpu.json
    python benchmarks/retrieval_gpu.py --smoke --device cpu --out /tmp/retrieval_smoke.json

Embeddings are unit rows stored in bf16 (as banks are). Time = median of CUDA-event timed runs after
one warm-up; peak extra memory from torch.cuda.max_memory_allocated.
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

from cir_plugins import metrics, similarity  # noqa: E402


def bare_topk(query, gallery, k, chunk):
    """Running top-k over bf16 score blocks. query (Q, D), gallery (G, D) -> (Q, k) scores, rows."""
    q = query.to(gallery.dtype)
    best_s = torch.full((q.shape[0], k), float("-inf"), device=q.device)
    best_r = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=q.device)
    for s in range(0, gallery.shape[0], chunk):
        sc = (q @ gallery[s:s + chunk].T).float()  # (Q, D) @ (D, C) -> (Q, C)
        v, i = sc.topk(min(k, sc.shape[1]), dim=1)
        cat_s = torch.cat([best_s, v], 1)
        cat_r = torch.cat([best_r, i + s], 1)
        top = cat_s.topk(k, dim=1)
        best_s, best_r = top.values, cat_r.gather(1, top.indices)
    return best_s, best_r


def _with_group(group, fn):
    """Run fn with topk_rows' candidate-filter group size ``group`` (0: the filter off)."""
    saved = metrics.TOPK_GROUP
    metrics.TOPK_GROUP = group
    try:
        return fn()
    finally:
        metrics.TOPK_GROUP = saved


def _upcast(fn):
    """Run fn with the library's bf16 scoring disabled (every chunk upcast to float32)."""
    saved = similarity.use_bf16_scoring
    similarity.use_bf16_scoring = lambda q, g: False
    try:
        return fn()
    finally:
        similarity.use_bf16_scoring = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--big-chunk", type=int, default=65536)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--goal-ms", type=float, default=60.0)
    p.add_argument("--group", type=int, default=None, help="metrics.TOPK_GROUP for the default rows")
    p.add_argument("--methods", default=None, help="comma-separated subset of the rows")
    p.add_argument("--sweep-groups", default="64,512", type=lambda v: [int(x) for x in v.split(",") if x],
                   help="extra topk_rows rows with these TOPK_GROUP sizes (checked for the same rows)")
    p.add_argument("--out", default="benchmarks/retrieval_gpu.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.queries, args.gallery, args.dim, args.big_chunk, args.iters = 64, 5003, 32, 1024, 1
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    gallery = torch.empty(args.gallery, args.dim, device=device, dtype=torch.bfloat16)
    for s in range(0, args.gallery, 1 << 18):  # unit rows, generated in slices
        e = min(args.gallery, s + (1 << 18))
        gallery[s:e] = F.normalize(torch.randn(e - s, args.dim, device=device, generator=g), dim=-1).to(torch.bfloat16)
    target = torch.randint(0, args.gallery, (args.queries,), device=device, generator=g)
    # queries near their targets, so the recalls are not all zero
    query = F.normalize(gallery[target].float() + 0.5 * torch.randn(args.queries, args.dim, device=device,
                                                                     generator=g) / args.dim**0.5, dim=-1)
    excl = (target[:, None] + 1) % args.gallery  # one removed candidate per query (CIRR's reference)

    runs = {
        "topk_rows": lambda: metrics.topk_rows(query, gallery, args.k),
        "topk_rows_no_filter": lambda: _with_group(0, lambda: metrics.topk_rows(query, gallery, args.k)),
        **{f"topk_rows_group{g}": (lambda g=g: _with_group(g, lambda: metrics.topk_rows(query, gallery, args.k)))
           for g in args.sweep_groups},
        "topk_rows_big_chunk": lambda: metrics.topk_rows(query, gallery, args.k, chunk_size=args.big_chunk),
        "retrieval_metrics": lambda: metrics.retrieval_metrics(query, gallery, target, ks=(1, 5, 10, 50),
                                                               exclude_rows=excl),
        "topk_rows_fp32_upcast": lambda: _upcast(lambda: metrics.topk_rows(query, gallery, args.k)),
        "bare_bf16_topk": lambda: bare_topk(query, gallery, args.k, args.big_chunk),
    }
    if args.group is not None:
        metrics.TOPK_GROUP = args.group
    if args.methods:
        runs = {name: fn for name, fn in runs.items() if name in args.methods.split(",")}
    rows, results = [], {}
    for name, fn in runs.items():
        row = dict(method=name, Q=args.queries, G=args.gallery, D=args.dim, k=args.k)
        try:
            results[name] = fn()  # warm-up
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.iters):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
            row["ms"] = statistics.median(times)
            row["meets_goal"] = row["ms"] < args.goal_ms
            if cuda:
                row["extra_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        rows.append(row)
    # the library's two top-k settings must agree exactly; the bare loop on rows up to bf16 ties
    if "topk_rows" in results and "topk_rows_big_chunk" in results:
        agree = bool(torch.equal(results["topk_rows"][1], results["topk_rows_big_chunk"][1]))
        for r in rows:
            if r["method"] == "topk_rows_big_chunk":
                r["same_rows_as_default"] = agree
    for r in rows:  # every filter setting returns exactly the default's rows and scores
        if r["method"].startswith(("topk_rows_no_filter", "topk_rows_group")) and "topk_rows" in results \
                and r["method"] in results:
            r["same_rows_and_scores_as_default"] = all(
                torch.equal(a, b) for a, b in zip(results["topk_rows"], results[r["method"]]))
    if "topk_rows" in results and "topk_rows_fp32_upcast" in results:
        same = float((results["topk_rows"][1] == results["topk_rows_fp32_upcast"][1]).double().mean())
        for r in rows:
            if r["method"] == "topk_rows_fp32_upcast":
                r["share_rows_equal_to_default"] = same
    if "retrieval_metrics" in results:
        for r in rows:
            if r["method"] == "retrieval_metrics":
                r["metrics"] = results["retrieval_metrics"]
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu")
    print(f"device: {name}; {args.queries} queries x {args.gallery} gallery, D={args.dim}, top-{args.k}; "
          f"goal {args.goal_ms} ms")
    print(f"{'method':22} {'ms':>10} {'goal':>5} {'extra_GB':>9}  same rows as topk_rows")
    for r in rows:
        ms = f"{r['ms']:10.2f}" if "ms" in r else f"{'-':>10}"
        eg = f"{r['extra_GB']:9.3f}" if "extra_GB" in r else f"{'-':>9}"
        same = r.get("same_rows_and_scores_as_default", "")
        print(f"{r['method']:22} {ms} {('yes' if r.get('meets_goal') else 'no'):>5} {eg}  {same} {r.get('note', '')}")
    out = dict(**record_header("retrieval_gpu"), device=name, topk_group=metrics.TOPK_GROUP, goal_ms=args.goal_ms,
               torch=torch.__version__, rows=rows)
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
