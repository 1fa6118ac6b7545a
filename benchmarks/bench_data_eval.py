"""Data and evaluation benchmark: world generation, image loading, evaluate(), and trivial baselines.

Prints a table and writes JSON (default benchmarks/data_eval_cpu.json).

    python benchmarks/bench_data_eval.py [--world DIR] [--full] [--out PATH]

--full also times the default-size world (about 21k images); without it only the quick preset is
generated (and reused from --world if already there). The "trivial baselines" rows are floors for
the synthetic world's difficulty: a model that ignores the text (query = the reference image's
raw pixels) and one that ignores the reference image cannot solve it, so their Rmean should be
far below a trained model's.
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
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cir_plugins as cp  # noqa: E402
from cir_plugins.data import synthetic  # noqa: E402


class PixelModel(torch.nn.Module):
    """Image-only baseline: embedding = the raw (downsampled) pixels; the text is ignored."""

    def encode_image(self, images):
        return torch.nn.functional.avg_pool2d(images, 2).flatten(1)  # (N, 3, H, W) -> (N, 3*H/2*W/2)

    def compose_query(self, reference, texts):
        return self.encode_image(reference)


class TextOnlyModel(torch.nn.Module):
    """Text-only baseline: the query is a bag of caption words projected into pixel space."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def encode_image(self, images):
        return torch.nn.functional.avg_pool2d(images, 2).flatten(1)

    def compose_query(self, reference, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
                out[i] += torch.randn(self.dim, generator=g)
        return out


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (render workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


LAST_CPU = [0.0]


def timed(fn):
    cpu, start = cpu_seconds(), time.perf_counter()
    value = fn()
    LAST_CPU[0] = cpu_seconds() - cpu
    return value, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", default=None, help="where to build / reuse the quick world")
    parser.add_argument("--full", action="store_true", help="also generate and evaluate the default-size world")
    parser.add_argument("--out", default="benchmarks/data_eval_cpu.json")
    args = parser.parse_args()
    rows = []
    base = Path(args.world) if args.world else Path(tempfile.mkdtemp()) / "worlds"
    sizes = ["quick"] + (["default"] if args.full else [])
    worlds = {}
    for size in sizes:
        root = base / size
        for attempt in ("generate", "reuse"):
            _, seconds = timed(lambda: synthetic.make_world(root, size=size, overwrite=(attempt == "generate")))
            n = sum(json.loads((root / "synthetic/world.json").read_text())["stats"]["images"].values())
            rows.append({"what": f"make_world {size} ({attempt})", "items": n, "seconds": seconds,
                         "per_second": n / seconds, "cpu_seconds": LAST_CPU[0]})
        worlds[size] = root
    root = worlds[sizes[-1]]
    split = cp.load_cirr(root, "val", transform="clip", size=224)
    ids = split.gallery_ids[:256]
    _, seconds = timed(lambda: split.images.batch(ids))
    rows.append({"what": "ImageStore.batch clip@224", "items": len(ids), "seconds": seconds,
                 "per_second": len(ids) / seconds, "cpu_seconds": LAST_CPU[0]})
    raw = cp.load_cirr(root, "val", transform="none")
    for name, model in [("image-only pixels", PixelModel()), ("text-only words", TextOnlyModel(3 * 20 * 20))]:
        result, seconds = timed(lambda: cp.evaluate(model, raw, show_progress=False, batch_size=256))
        rows.append({"what": f"evaluate val, {name}", "items": len(raw.gallery_ids), "seconds": seconds,
                     "per_second": len(raw.gallery_ids) / seconds, "cpu_seconds": LAST_CPU[0],
                     "metrics": {k: round(v, 2) for k, v in result.items() if isinstance(v, float)}})
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'what':42s} {'items':>7s} {'seconds':>8s} {'cpu s':>8s} {'items/s':>9s}  metrics")
    for row in rows:
        metrics = row.get("metrics", "")
        print(f"{row['what']:42s} {row['items']:7d} {row['seconds']:8.2f} {row['cpu_seconds']:8.2f} "
              f"{row['per_second']:9.0f}  {metrics}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "world": str(root),
            "load_average_1min": os.getloadavg()[0]}
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
