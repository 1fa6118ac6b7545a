"""``cir-plugins build-bank``: encode every image of a split once into a negative bank file.

Example::

    cir-plugins build-bank --model my_model.py:build --dataset cirr --root /data/cirr --split train \
        --out runs/bank.safetensors --dedup

With ``--dedup`` pixel-identical images share one row (:func:`cir_plugins.positives.dedup.find_duplicates`);
``--groups groups.json`` (a JSON object id -> group id) gives the groups instead. ``--cache-dir``
makes the build resumable: rerun the same command after a kill and finished chunks are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from .._cli_common import add_factory_arguments, model_from_factory
from ..errors import DataError, explain

__all__ = ["configure", "run", "add_model_arguments", "add_dataset_arguments", "build_model", "load_dataset",
           "read_groups"]

logger = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add_factory_arguments(parser)
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: the model's device)")


def add_dataset_arguments(parser: argparse.ArgumentParser, *, default_split: str = "train") -> None:
    parser.add_argument("--dataset", required=True, choices=("cirr", "fashioniq", "synthetic"))
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--split", default=default_split, help=f"split name on disk (default: {default_split})")
    parser.add_argument("--category", default=None, choices=("dress", "shirt", "toptee"),
                        help="FashionIQ category")
    parser.add_argument("--transform", default="clip", choices=("clip", "targetpad", "squarepad", "none"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--groups", default=None, help="JSON object image id -> duplicate-group id")
    parser.add_argument("--dedup", action="store_true", help="group pixel-identical images (overrides --groups)")
    parser.add_argument("--on-bad-record", default="error", choices=("error", "skip"),
                        help="a malformed annotation record stops the run (error, default) or is logged, counted "
                             "and skipped (skip)")


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_dataset_arguments(parser)
    parser.add_argument("--out", required=True, help="bank file to write (.safetensors)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="bank dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="folder of resumable partial shards")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_model(args: argparse.Namespace) -> Any:
    """The factory's model, wrapped to the protocol, on ``--device``."""
    from ..protocol import wrap_model

    model = wrap_model(model_from_factory(args))
    if args.device is not None:
        model = model.to(args.device)
    return model


def load_dataset(args: argparse.Namespace):
    from ..data.fashioniq import load_split

    return load_split(args.root, args.dataset, args.split, args.category, transform=args.transform,
                      size=args.image_size, on_bad_record=getattr(args, "on_bad_record", "error"))


def read_groups(args: argparse.Namespace, split: Any, show_progress: bool) -> dict[str, str] | None:
    if args.dedup:
        from ..positives.dedup import find_duplicates

        return find_duplicates(list(split.gallery_ids), split.images, show_progress=show_progress)
    if args.groups is None:
        return None
    path = Path(args.groups)
    try:
        groups = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(explain("cannot read the groups file", got=f"{path}: {error}",
                                expected="a JSON object image id -> group id")) from error
    if not isinstance(groups, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in groups.items()):
        raise DataError(explain("the groups file must be a JSON object of strings", got=type(groups).__name__))
    return groups


def run(args: argparse.Namespace) -> int:
    from .bank import NegativeBank

    model = build_model(args)
    split = load_dataset(args)
    groups = read_groups(args, split, not args.no_progress)
    bank = NegativeBank.build(model, list(split.gallery_ids), split.images, groups=groups,
                              batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                              num_workers=args.num_workers, show_progress=not args.no_progress,
                              cache_dir=args.cache_dir)
    bank.save(args.out)
    print(f"wrote {bank!r} to {args.out}")
    return 0
