"""``cir-plugins augment``: generate triplets for a training split from the command line.

    cir-plugins augment --dataset cirr --root data/CIRR --split train \\
        --captioner hf:llava-hf/llava-1.5-7b-hf --pair-encoder my_model.py:build \\
        --rank-window 10000,15000 --partners 1 --templates cirr --seed 0 --out generated.json

Captioner specs: ``hf:<hub name or local path>``, ``file:<captions.json|.jsonl>``,
``synthetic[:noise]`` (the synthetic world's scene captions, from ``--root``). The pair encoder is a
factory spec (``file.py:function`` or ``pkg.module:function``) returning a callable images
(n, C, H, W) -> (n, D) or a model with ``encode_image``. The output is in the dataset's annotation
schema (CIRR for cirr/synthetic, FashionIQ for fashioniq); a ``<out>.summary.json`` holds the run's
summary, which is also printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError, explain
from ._common import (add_dataset_arguments, add_device_argument, add_factory_arguments, add_progress_argument,
                      load_dataset, model_from_factory)

__all__ = ["configure", "run", "build_captioner"]


def configure(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--captioner", required=True,
                        help="hf:<name-or-path> | file:<captions.json|jsonl> | synthetic[:noise]")
    add_factory_arguments(parser, flag="--pair-encoder",
                          help="factory spec 'file.py:function' or 'pkg.module:function' returning a callable "
                               "images -> (n, D) or a model with encode_image")
    add_device_argument(parser)
    parser.add_argument("--rank-window", default="10000,15000",
                        help="'a,b' absolute ranks, or fractions of N such as '0.2,0.3'; '-1' = any image")
    parser.add_argument("--partners", type=int, default=1, help="partners per image")
    parser.add_argument("--templates", action="append", default=None,
                        help="preset (cirr, fashioniq, all) or a template with {reference}/{target}; repeatable "
                             "(default: fashioniq for FashionIQ, else cirr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refer", action="store_true", help="only images that are references of annotated triplets")
    parser.add_argument("--max-triplets", type=int, default=None, help="subsample to at most this many triplets")
    parser.add_argument("--near-duplicate-threshold", type=float, default=None,
                        help="also merge images whose pair-encoder cosine is at least this")
    parser.add_argument("--no-dedup", action="store_true", help="do not merge pixel-identical images")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest text (whitespace words)")
    parser.add_argument("--cache-dir", default=None, help="caption cache folder (default: <out>.cache)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per pair-encoder call")
    parser.add_argument("--caption-batch-size", type=int, default=8, help="images per captioner call")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"),
                        help="captioner dtype (hf:)")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="captioner generation length (hf:)")
    parser.add_argument("--words", type=int, default=10, help="k in the prompt 'describe ... in {k} words' (hf:)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the hub model's own code (hf:)")
    parser.add_argument("--skip-empty", action="store_true", help="skip (and count) images with empty captions")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="drop images that cannot be decoded (missing, empty, corrupt, over the pixel limit): "
                             "logged and counted in the summary; default: stop at the first one")
    parser.add_argument("--out", required=True, help="annotation JSON to write")
    parser.add_argument("--first-pair-id", type=int, default=10_000_000, help="first pairid of generated CIRR records")
    add_progress_argument(parser)


def build_captioner(spec: str, args: argparse.Namespace) -> Any:
    """A captioner from a command-line spec (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        from ..positives.captioners import HFCaptioner

        fashion = args.dataset == "fashioniq"
        return HFCaptioner(rest, domain="fashion" if fashion else "general", category=args.category if fashion else None,
                           k=args.words, device=args.device or "cpu", dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                           batch_size=args.caption_batch_size, skip_empty=args.skip_empty,
                           trust_remote_code=args.trust_remote_code)
    if kind == "file" and rest:
        from ..positives.captioners import PrecomputedCaptioner

        return PrecomputedCaptioner(rest)
    if kind == "synthetic":
        from ..data.synthetic import SyntheticCaptioner

        try:
            noise = float(rest) if rest else 0.0
        except ValueError:
            raise ConfigError(explain("synthetic captioner noise must be a number", got=rest,
                                      fix="write synthetic or synthetic:0.1")) from None
        return SyntheticCaptioner(args.root, noise=noise, seed=args.seed)
    raise ConfigError(explain("unknown captioner spec", got=spec,
                              expected="hf:<name-or-path>, file:<captions.json>, synthetic[:noise]"))


def _pair_encoder(args: argparse.Namespace) -> Any:
    encoder = model_from_factory(args, spec=args.pair_encoder)
    if args.device is not None and callable(getattr(encoder, "to", None)):
        encoder = encoder.to(args.device)
    return encoder


def run(args: argparse.Namespace) -> int:
    from ..positives.annotations import atomic_write_json, write_generated_cirr, write_generated_fashioniq
    from ..positives.augmenter import TripletAugmenter

    fashion = args.dataset == "fashioniq"
    split = load_dataset(args)
    captioner = build_captioner(args.captioner, args)
    out = Path(args.out)
    augmenter = TripletAugmenter(
        captioner, _pair_encoder(args), templates=args.templates or ("fashioniq" if fashion else "cirr"),
        rank_window=args.rank_window, partners_per_image=args.partners, seed=args.seed, dedup=not args.no_dedup,
        near_duplicate_threshold=args.near_duplicate_threshold, refer_only=args.refer,
        max_triplets=args.max_triplets, cache_dir=args.cache_dir or f"{out}.cache", batch_size=args.batch_size,
        caption_batch_size=args.caption_batch_size, max_tokens=args.max_tokens, skip_empty=args.skip_empty,
        show_progress=not args.no_progress)
    image_ids = list(split.gallery_ids)
    unreadable: list[str] = []
    if args.skip_unreadable:  # one decode per image before the long steps, so none of them can fail later
        kept = split.images.readable_ids(image_ids)
        unreadable = sorted(set(image_ids) - set(kept))
        image_ids = kept
    result = augmenter.augment(image_ids, split.images, split.triplets)
    triplets = result.triplets
    if fashion:
        write_generated_fashioniq(triplets, out)
    else:
        write_generated_cirr(triplets, out, first_pair_id=args.first_pair_id)
    summary = {"dataset": args.dataset, "split": args.split, "category": args.category,
               "captioner": captioner.name, "out": str(out), "unreadable_skipped": unreadable,
               **result.summary}
    atomic_write_json(f"{out}.summary.json", summary)
    s = result.summary
    print(f"images {s['images']} | duplicate groups {s['duplicate_groups']} ({s['duplicates_merged']} merged) | "
          f"captions {s['captions']['new']} new, {s['captions']['cached']} cached, {s['captions']['skipped']} skipped | "
          f"pairs {s['pairs']} | same-caption skipped {s['skipped_same_caption']} | triplets {s['triplets']}")
    print("seconds: " + ", ".join(f"{step} {sec:.2f}" for step, sec in s["seconds"].items()))
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable images (listed in the summary), e.g. {unreadable[:3]}")
    print(f"wrote {len(triplets)} generated triplets to {out}")
    return 0
