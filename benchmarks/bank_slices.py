"""Peak host memory per rank reading a bank file whole (today) or only the rank's slice (issue 29, item 1).

Writes a bank of ``--rows`` x ``--dim`` unit rows (default 700k x 768 float32, 2.15 GB) with block checksums
into a temporary folder (and, with ``--old-format``, a copy without block checksums), then for each mode starts
``--world`` gloo ranks (fresh processes, one torch thread each) that read the file once through
:func:`read_rows` and report: the peak resident memory of the read (Linux's VmHWM, reset just before it through
/proc/self/clear_refs; ``read peak`` = that peak minus the resident set before the read), the file-backed /
anonymous split after it (a mapped file's pages are page cache, shared by the ranks of one host) and the read's
seconds. ``ru_maxrss`` is kept in the JSON but not used: a spawned process inherits its parent's peak at the
fork (Linux keeps the larger across exec), here the writer's. The files are deleted at the end. The page
cache is warm (the file was just written): the seconds are not cold-disk times.

    python benchmarks/bank_slices.py --rows 700000 --dim 768 --old-format --out benchmarks/bank_slices.json

Modes: ``full`` (the whole file, verified whole: what every rank does today), ``slice`` (the rank's rows
``shard_rows(N, rank, world)``, verifying the blocks they touch) and, with ``--old-format``, ``slice_old``
(the same rows of a file without block checksums: verified by streaming the whole file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import record_header, write_json  # noqa: E402

from cir_plugins.negatives.bank import NegativeBank  # noqa: E402
from cir_plugins.negatives.bank_format import (  # noqa: E402
    FORMAT,
    VERSION,
    checksum,
    checksummed_metadata,  # noqa: E402
)


def read_rows(path: str, shard: tuple[int, int] | None) -> torch.Tensor:
    """The one read each rank times: ``shard=None`` reads the whole file, else the rank's slice."""
    return NegativeBank.load(path, shard=shard).embeddings


def _status() -> dict:
    with open("/proc/self/status") as status:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in status)
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def _rank(rank: int, world: int, folder: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{mode}", rank=rank, world_size=world)
    path = os.path.join(folder, "old.safetensors" if mode == "slice_old" else "bank.safetensors")
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
    before = _status()["VmRSS"]
    start = time.perf_counter()
    rows = read_rows(path, None if mode == "full" else (rank, world))
    seconds = time.perf_counter() - start
    after = _status()
    result = dict(mode=mode, rank=rank, rows=len(rows), row_bytes=rows[0].numel() * rows.element_size(),
                  seconds=round(seconds, 3), peak_rss=after["VmHWM"], rss_before=before,
                  read_peak=after["VmHWM"] - before, rss_after=after["VmRSS"], rss_file_after=after["RssFile"],
                  rss_anon_after=after["RssAnon"],
                  ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # kilobytes on Linux
    Path(folder, f"{mode}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _write_bank(path: Path, rows: int, dim: int, dtype: torch.dtype, old: Path | None) -> int:
    emb = torch.empty(rows, dim, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    for start in range(0, rows, 65536):  # in chunks: no float32 copy of a bf16 bank
        stop = min(start + 65536, rows)
        emb[start:stop] = F.normalize(torch.randn(stop - start, dim, generator=generator), dim=-1).to(dtype)
    ids = [f"im{i}" for i in range(rows)]
    meta = {"format": FORMAT, "version": VERSION, "ids": json.dumps(ids), "rows": json.dumps(list(range(rows))),
            "dtype": str(dtype).replace("torch.", ""), "similarity": "dot", "shape": json.dumps([rows, dim]),
            "fingerprint": "bench"}
    save_file({"embeddings": emb}, str(path), metadata=checksummed_metadata(emb, meta))
    if old is not None:  # the format before block checksums: the whole-file checksum only
        save_file({"embeddings": emb}, str(old), metadata={**meta, "checksum": checksum(emb, meta)})
    return path.stat().st_size


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=700_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--old-format", action="store_true", help="also read a file without block checksums")
    parser.add_argument("--tmp", default=None, help="folder for the temporary bank files (default: the system's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        start = time.perf_counter()
        size = _write_bank(Path(folder, "bank.safetensors"), args.rows, args.dim, getattr(torch, args.dtype),
                           Path(folder, "old.safetensors") if args.old_format else None)
        write_seconds = time.perf_counter() - start
        for mode in ("full", "slice") + (("slice_old",) if args.old_format else ()):
            mp.spawn(_rank, args=(args.world, folder, mode), nprocs=args.world, join=True)
            results += [json.loads(Path(folder, f"{mode}-{r}.json").read_text()) for r in range(args.world)]
    gb = 1e9
    print(f"bank {args.rows} x {args.dim} {args.dtype}: {size / gb:.2f} GB file (written in {write_seconds:.0f} s), "
          f"{args.world} gloo ranks")
    print(f"{'mode':<10} {'rank':>4} {'rows':>8} {'rows GB':>8} {'RSS before':>10} {'peak RSS':>8} {'read peak':>9} "
          f"{'file-backed after':>17} {'anon after':>10} {'s':>6}   (GB)")
    for r in results:
        print(f"{r['mode']:<10} {r['rank']:>4} {r['rows']:>8} {r['rows'] * r['row_bytes'] / gb:>8.2f} "
              f"{r['rss_before'] / gb:>10.2f} {r['peak_rss'] / gb:>8.2f} {r['read_peak'] / gb:>9.2f} "
              f"{r['rss_file_after'] / gb:>17.2f} {r['rss_anon_after'] / gb:>10.2f} {r['seconds']:>6.2f}")
    record = {**record_header("bank_slices"), "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(),
                                                          "platform": platform.platform(), "torch": torch.__version__},
              "rows": args.rows, "dim": args.dim, "dtype": args.dtype, "world": args.world, "file_bytes": size,
              "write_seconds": round(write_seconds, 1), "results": results}
    if args.out:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
