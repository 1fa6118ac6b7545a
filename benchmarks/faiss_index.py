"""FAISS export of a 1M-row bank: recall@50 of the compressed index against exact search, memory, build
and query time.

Data: synthetic clustered embeddings (N rows, D dims, ``--clusters`` centres; a row is its centre plus
Gaussian noise of the same norm, L2-normalised, so rows of one cluster have cosine ~0.5 and others ~0),
queries = gallery rows plus smaller noise (a composed query lands near its target). ``--data random``
uses isotropic Gaussian rows instead (no structure: the hardest case for any compressed index).

Exact = the library's ``metrics.topk_rows`` (and FAISS ``IndexFlatIP``, checked equal). Compressed =
``IVF{nlist},PQ{D/4}x4fs`` (``build_faiss_index(bank, "ivfpq")``'s default codes: D/8 bytes a row), searched at several
``nprobe``.
recall@50 = |compressed top-50 ∩ exact top-50| / 50, averaged over queries. Memory = bytes of the
serialised index. Runs with ``--threads`` FAISS/torch threads (default 1: the box is shared).

    nice -n 19 python benchmarks/faiss_index.py [--rows 1000000 --dim 256 --queries 1000]
"""

from __future__ import annotations

import argparse
import platform
import time

import _common
import torch
import torch.nn.functional as F


def _embeddings(n: int, d: int, clusters: int, kind: str, seed: int, chunk: int = 100_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, d)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=1) if kind == "clustered" else None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        noise = torch.randn(stop - start, d, generator=g)
        if centres is not None:
            noise = centres[torch.randint(clusters, (stop - start,), generator=g)] + noise / d ** 0.5
        out[start:stop] = F.normalize(noise, dim=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--data", choices=("clustered", "random"), default="clustered")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--m", type=int, default=None, help="PQ sub-quantizers (default: the library's, D/4 at 4 bits)")
    parser.add_argument("--nbits", type=int, default=4, help="bits per PQ code (4: fast-scan, the library default)")
    parser.add_argument("--nprobe", default="8,32,128")
    parser.add_argument("--train-size", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/faiss_index.json")
    args = parser.parse_args()

    import faiss

    from cir_plugins.metrics import topk_rows
    from cir_plugins.negatives.bank import NegativeBank
    from cir_plugins.negatives.faiss_index import build_faiss_index

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    emb = _embeddings(args.rows, args.dim, args.clusters, args.data, seed=0)  # (N, D)
    g = torch.Generator().manual_seed(1)
    picked = torch.randint(args.rows, (args.queries,), generator=g)
    query = F.normalize(emb[picked] + 0.5 * torch.randn(args.queries, args.dim, generator=g) / args.dim ** 0.5, dim=1)
    bank = NegativeBank(emb, [str(i) for i in range(args.rows)], range(args.rows), similarity="dot",
                        fingerprint="synthetic")
    data_s = time.perf_counter() - t0
    print(f"data: {args.rows} x {args.dim} {args.data} rows, {args.queries} queries ({data_s:.1f} s)")

    t0 = time.perf_counter()
    exact_scores, exact = topk_rows(query, emb, args.k)
    exact_s = time.perf_counter() - t0
    rows = [dict(index="exact: metrics.topk_rows", build_s=0.0, memory_bytes=emb.numel() * 4,
                 query_s=round(exact_s, 2), recall_at_k=1.0)]
    print(f"exact topk_rows: {exact_s:.1f} s")

    t0 = time.perf_counter()
    flat = build_faiss_index(bank, "flat")
    flat_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, flat_rows = flat.search(query, args.k)
    flat_s = time.perf_counter() - t0
    flat_equal = float((flat_rows == exact).all(dim=1).float().mean())
    rows.append(dict(index="FAISS IndexFlatIP", build_s=round(flat_build, 2), memory_bytes=flat.memory_bytes(),
                     query_s=round(flat_s, 2), recall_at_k=_recall(flat_rows, exact), identical_rankings=flat_equal))
    print(f"flat: build {flat_build:.1f} s, query {flat_s:.1f} s, identical rankings {flat_equal:.3f}")
    del flat

    t0 = time.perf_counter()
    ivfpq = build_faiss_index(bank, "ivfpq", nlist=args.nlist, m=args.m, nbits=args.nbits,
                              train_size=args.train_size)
    build_s = time.perf_counter() - t0
    memory = ivfpq.memory_bytes()
    print(f"{ivfpq.factory}: build {build_s:.1f} s, {memory / 1e6:.1f} MB")
    for nprobe in [int(p) for p in args.nprobe.split(",")]:
        ivfpq.set_nprobe(nprobe)
        t0 = time.perf_counter()
        _, found = ivfpq.search(query, args.k)
        query_s = time.perf_counter() - t0
        rows.append(dict(index=f"FAISS {ivfpq.factory} nprobe={nprobe}", build_s=round(build_s, 2),
                         memory_bytes=memory, query_s=round(query_s, 3), recall_at_k=_recall(found, exact)))

    print(f"\n{'index':36} {'build s':>8} {'memory MB':>10} {'query s':>8} {'recall@' + str(args.k):>10}")
    for row in rows:
        print(f"{row['index']:36} {row['build_s']:8.1f} {row['memory_bytes'] / 1e6:10.1f} {row['query_s']:8.2f} "
              f"{row['recall_at_k']:10.3f}")
    record = _common.record_header("faiss_index")
    record.update(machine=f"{platform.node()} {platform.machine()}, threads={args.threads}", faiss=faiss.__version__,
                  torch=torch.__version__, rows_n=args.rows, dim=args.dim, queries=args.queries, data=args.data,
                  clusters=args.clusters, k=args.k, train_size=args.train_size, data_seconds=round(data_s, 1),
                  rows=rows)
    _common.write_json(args.out, record)
    print(f"wrote {args.out}")


def _recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of |found ∩ exact| / k."""
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return round(hits / exact.numel(), 4)


if __name__ == "__main__":
    main()
