"""``cir-plugins build-bank``: encode every image of a split once into a negative bank file.

    cir-plugins build-bank --model my_model.py:build --dataset cirr --root /data/cirr --out runs/bank.safetensors

Pixel-identical images share one row by default, so a copy of a query's target is never its negative
(``--groups`` gives the groups instead, ``--no-dedup`` keeps one row per id). With ``--cache-dir`` a rerun after
a kill reuses the finished chunks.
"""

from __future__ import annotations

import argparse

from ._common import (
    add_dataset_arguments,
    add_groups_arguments,
    add_model_arguments,
    add_progress_argument,
    build_model,
    load_dataset,
    read_groups,
    show_progress,
)

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_dataset_arguments(parser)
    add_groups_arguments(parser)
    parser.add_argument("--out", required=True, help="bank file to write (.safetensors)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="bank dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="folder of resumable partial shards")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    from .._atomic import check_writable
    from ..negatives.bank import NegativeBank

    check_writable(args.out)  # a read-only or wrong --out: now, not after encoding the whole gallery
    model = build_model(args)
    split = load_dataset(args)
    groups = read_groups(args, split, show_progress(args))
    bank = NegativeBank.build(model, list(split.gallery_ids), split.images, groups=groups, dedup=not args.no_dedup,
                              batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                              num_workers=args.num_workers, show_progress=show_progress(args),
                              cache_dir=args.cache_dir)
    bank.save(args.out)
    print(f"wrote {bank!r} to {args.out}")
    return 0
