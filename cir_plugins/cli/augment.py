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

from ..errors import ConfigError, DataError, explain
from ._common import (add_dataset_arguments, add_device_argument, add_factory_arguments, add_progress_argument,
                      load_dataset, model_from_factory, show_progress)

__all__ = ["configure", "run", "build_captioner", "DEFAULT_RANK_WINDOWS"]

# --rank-window by dataset, as fractions of N: the release's absolute windows over its training sets
# (CIRR [10000, 15000) of 16,939 images; FashionIQ [10000, 20000) of about 46k images of the three
# categories), so the same share of the ranking is used whatever the gallery's size
DEFAULT_RANK_WINDOWS = {"cirr": "0.59,0.89", "fashioniq": "0.21,0.43", "synthetic": "0.59,0.89"}


def configure(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--captioner", required=True,
                        help="hf:<name-or-path> | file:<captions.json|jsonl> | synthetic[:noise]")
    add_factory_arguments(parser, flag="--pair-encoder",
                          help="factory spec 'file.py:function' or 'pkg.module:function' returning a callable "
                               "images -> (n, D) or a model with encode_image")
    add_device_argument(parser)
    parser.add_argument("--rank-window", default=None,
                        help="where a partner is drawn from in each image's similarity ranking: 'a,b' as fractions "
                             "of N (floats such as '0.6,0.9'), absolute ranks (ints such as '10000,15000', the "
                             "method's release on CIRR's 16,939 training images), or '-1' for any image. Default: "
                             + ", ".join(f"{d} {w}" for d, w in DEFAULT_RANK_WINDOWS.items())
                             + " (the release's windows as fractions of its training sets)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the file and exit 0 even when no triplet was generated (default: an error)")
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
    parser.add_argument("--out", required=True, help="annotation JSON to write")
    parser.add_argument("--first-pair-id", type=int, default=10_000_000, help="first pairid of generated CIRR records")
    add_progress_argument(parser)


def build_captioner(spec: str, args: argparse.Namespace) -> Any:
    """A captioner from a command-line spec (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        from ..positives.captioners import HFCaptioner

        fashion = args.dataset == "fashioniq"
        # FashionIQ: one category for every image (--category), or image id -> category (several categories)
        category = getattr(args, "categories", None) or (args.category if fashion else None)
        return HFCaptioner(rest, domain="fashion" if fashion else "general", category=category,
                           prompt=getattr(args, "prompt", None), k=args.words, device=args.device or "cpu",
                           dtype=args.dtype, max_new_tokens=args.max_new_tokens,
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


def _nothing_generated(summary: dict, window: str) -> str:
    """The error for an augment run that generated no triplet: the window, the gallery's size, the fix."""
    n = summary["unique_images"]
    if summary["pairs"] == 0:
        why = (f"the rank window {window} holds no partner for any of the {summary['queries']} query images: "
               f"each has {n - 1} others to rank (ints are absolute ranks; floats are fractions of N)")
    else:
        why = (f"{summary['pairs']} pairs were drawn with the rank window {window}, but every one was dropped "
               f"({summary['skipped_same_caption']} with equal captions, {summary['skipped_no_caption']} without "
               "a caption)")
    return explain(f"augment generated no triplets from {summary['images']} images ({n} after merging duplicates)",
                   got=why, fix="pass a window as fractions of N, e.g. --rank-window 0.59,0.89 (or -1 for any "
                                "partner), check the captioner, or pass --allow-empty to write an empty file anyway")


def _pair_encoder(args: argparse.Namespace) -> Any:
    encoder = model_from_factory(args, spec=args.pair_encoder)
    if args.device is not None and callable(getattr(encoder, "to", None)):
        encoder = encoder.to(args.device)
    return encoder


def run(args: argparse.Namespace) -> int:
    from ..positives.annotations import atomic_write_json, write_generated_cirr, write_generated_fashioniq
    from ..positives.augmenter import TripletAugmenter

    fashion = args.dataset == "fashioniq"
    window = args.rank_window or DEFAULT_RANK_WINDOWS[args.dataset]
    split = load_dataset(args)
    captioner = build_captioner(args.captioner, args)
    out = Path(args.out)
    augmenter = TripletAugmenter(
        captioner, _pair_encoder(args), templates=args.templates or ("fashioniq" if fashion else "cirr"),
        rank_window=window, partners_per_image=args.partners, seed=args.seed, dedup=not args.no_dedup,
        near_duplicate_threshold=args.near_duplicate_threshold, refer_only=args.refer,
        max_triplets=args.max_triplets, cache_dir=args.cache_dir or f"{out}.cache", batch_size=args.batch_size,
        caption_batch_size=args.caption_batch_size, max_tokens=args.max_tokens, skip_empty=args.skip_empty,
        show_progress=show_progress(args))
    unreadable = split.info.get("unreadable", [])
    result = augmenter.augment(list(split.gallery_ids), split.images, split.triplets)
    triplets = result.triplets
    if not triplets and not args.allow_empty:
        raise DataError(_nothing_generated(result.summary, window))
    if fashion:
        write_generated_fashioniq(triplets, out)
    else:
        write_generated_cirr(triplets, out, first_pair_id=args.first_pair_id)
    summary = {"dataset": args.dataset, "split": args.split, "category": args.category,
               "captioner": captioner.name, "out": str(out), "rank_window": window, "unreadable_skipped": unreadable,
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
