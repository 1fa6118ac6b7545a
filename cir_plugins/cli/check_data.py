"""``cir-plugins check-data``: check a CIRR or FashionIQ download, or the synthetic world (see
:mod:`cir_plugins.data.check`). Prints the report (``--report FILE``: also as JSON); exit code 0 when the tree is
complete, else 1 (with ``--strict``, duplicate images count as incomplete too)."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ._common import add_progress_argument, add_transform_arguments, read_json_file, show_progress


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=("cirr", "fashioniq", "synthetic"),
                        help="the dataset to check; synthetic: the world of cir-plugins world (splits train, val, "
                             "test; the counts it recorded), also recognised under --dataset cirr by its record "
                             "synthetic/world.json")
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--report", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--decode", action="store_true",
                        help="decode every image fully (default: headers and end markers only, much faster)")
    parser.add_argument("--splits", default=None, help="comma-separated split names (default: train,val,test1 for "
                                                       "cirr; train,val,test for fashioniq and synthetic)")
    parser.add_argument("--category", action="append", default=None,
                        help="FashionIQ category to check (repeatable; default: all three)")
    parser.add_argument("--counts", default="official",
                        help="'official' (compare with the release's counts, default), 'none', or a JSON file "
                             "{split or category/split: {\"images\": n, \"triplets\": m}}")
    parser.add_argument("--strict", action="store_true", help="duplicate images also make the exit code non-zero")
    add_transform_arguments(parser, recorded=False)  # an image too large inside this transform is reported
    add_progress_argument(parser)


def _counts(value: str):
    if value in ("official", "none"):
        return None if value == "none" else value
    return read_json_file(value, "the --counts file", error=ConfigError,
                          fix="pass 'official', 'none' or a JSON object {split: {\"images\": n, \"triplets\": m}}")


def run(args: argparse.Namespace) -> int:
    from ..data.check import check_dataset

    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    report = check_dataset(args.root, args.dataset, decode=args.decode, splits=splits, categories=args.category,
                           counts=_counts(args.counts), transform=args.transform, image_size=args.image_size,
                           show_progress=show_progress(args))
    print(report.format())
    if args.report:
        print(f"report written to {report.write_json(args.report)}")
    return 1 if not report.ok or (args.strict and report.images["duplicates"]) else 0
