"""Time ``check_dataset`` (what ``cir-plugins check-data`` runs) on a CIRR-layout tree of ~20k tiny PNGs.

The tree is written by the package's own fixture builder (``build_cirr_tree``: nested ``./train/NN/``
folders, rc2 caption and split files) into a temporary folder, one third of the images per split
(train / val / test1), then checked twice: header + end-marker check (the default) and full decode
(``--decode``). Each image is about 30x24 pixels of random noise, so the decode row is a lower bound
for real CIRR images; the header row reads the same bytes per file whatever the image size. Equal-size
noise PNGs make every file a duplicate candidate, so the byte hashing runs on all of them (worst case).

    python benchmarks/check_data.py [--images 20000] [--out benchmarks/check_data.json]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import _common

from cir_plugins.data.check import check_dataset
from cir_plugins.data.fixtures import build_cirr_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="images in the tree (split in three)")
    parser.add_argument("--triplets-per-split", type=int, default=4000)
    parser.add_argument("--root", default=None, help="where to build the tree (default: a temporary folder, removed)")
    parser.add_argument("--out", default="benchmarks/check_data.json")
    args = parser.parse_args()
    temp = args.root is None
    root = Path(tempfile.mkdtemp(prefix="cir_check_data_")) if temp else Path(args.root)
    try:
        start = time.perf_counter()
        per_split = -(-args.images // 3)
        build_cirr_tree(root, n_images=per_split, n_triplets=args.triplets_per_split)
        build_s = time.perf_counter() - start
        rows = []
        for decode in (False, True):
            report = check_dataset(root, "cirr", decode=decode, counts=None)
            rows.append(
                {
                    "mode": report.mode,
                    "image_files": report.images["checked"],
                    "seconds": round(report.seconds, 2),
                    "images_per_s": round(report.images["checked"] / report.seconds),
                    "ok": report.ok,
                }
            )
        print(f"tree: {3 * per_split} PNGs, {3 * args.triplets_per_split} triplets, built in {build_s:.1f} s at {root}")
        print(f"{'mode':8} {'files':>7} {'seconds':>8} {'files/s':>8}  ok")
        for row in rows:
            print(
                f"{row['mode']:8} {row['image_files']:7d} {row['seconds']:8.2f} {row['images_per_s']:8d}  {row['ok']}"
            )
        record = _common.record_header("check_data")
        record.update(machine=f"{platform.node()} {platform.machine()}, {platform.processor() or 'cpu'}",
                      images=3 * per_split, triplets=3 * args.triplets_per_split, build_seconds=round(build_s, 1),
                      rows=rows)
        _common.write_json(args.out, record)
        print(f"wrote {args.out}")
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
