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

Defaults come from the dataset's recipe (``cir-plugins recipe show clip4cir-cirr`` / ``clip4cir-fashioniq``):
the rank window as a share of N, refer-only (FashionIQ) and the caption word budget. FashionIQ generates
over its three categories' training images together, as the method's release does (with absolute ranks
inside one category, whose size differs, the same window would fall elsewhere in the ranking); each image
is captioned with its own category in the prompt. ``--category`` restricts a run to one category.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data.fashioniq import CATEGORIES
from ..errors import ConfigError, DataError, explain
from ._common import (add_dataset_arguments, add_device_argument, add_factory_arguments, add_progress_argument,
                      load_dataset, model_from_factory, show_progress)

__all__ = ["configure", "run", "build_captioner", "DEFAULT_RANK_WINDOWS"]



def _recipe_defaults() -> dict[str, dict[str, Any]]:
    """Per dataset, the defaults of the dataset's recipe (cir_plugins/recipes, CLIP4Cir's row): the rank window
    as fractions of N (the release's absolute window over its training set's size, so the same share of the
    ranking is used whatever the gallery's size), refer-only and the caption word budget. The synthetic world
    (CIRR layout, no paper recipe) takes CIRR's."""
    from ..recipes import default_recipe

    out = {}
    for dataset in ("cirr", "fashioniq"):
        generation = default_recipe(dataset).generation
        low, high = generation.window_fractions(dataset)
        out[dataset] = {"rank_window": f"{low},{high}", "refer": generation.refer_only, "words": generation.words}
    out["synthetic"] = dict(out["cirr"])
    return out


RECIPE_DEFAULTS = _recipe_defaults()
# --rank-window by dataset (from RECIPE_DEFAULTS)
DEFAULT_RANK_WINDOWS = {dataset: d["rank_window"] for dataset, d in RECIPE_DEFAULTS.items()}


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
    parser.add_argument("--refer", action=argparse.BooleanOptionalAction, default=None,
                        help="only images that are references of annotated triplets get partners (default: the "
                             "dataset's recipe: on for FashionIQ, off for CIRR and the synthetic world)")
    parser.add_argument("--max-triplets", type=int, default=None, help="subsample to at most this many triplets")
    parser.add_argument("--near-duplicate-threshold", type=float, default=None,
                        help="also merge images whose pair-encoder cosine is at least this")
    parser.add_argument("--no-dedup", action="store_true", help="do not merge pixel-identical images")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest text (whitespace words)")
    parser.add_argument("--cache-dir", default=None, help="caption cache folder (default: <out>.cache)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per pair-encoder call")
    parser.add_argument("--words", type=int, default=None,
                        help="k in the prompt 'describe ... in {k} words' (hf:; default: the dataset's recipe, "
                             + ", ".join(f"{d} {v['words']}" for d, v in RECIPE_DEFAULTS.items()) + ")")
    add_captioner_arguments(parser)
    parser.add_argument("--out", required=True, help="annotation JSON to write")
    parser.add_argument("--first-pair-id", type=int, default=10_000_000, help="first pairid of generated CIRR records")
    add_progress_argument(parser)


def add_captioner_arguments(parser: argparse.ArgumentParser) -> None:
    """The captioner flags :func:`build_captioner` reads besides the spec (augment and recipe run declare them here)."""
    parser.add_argument("--caption-batch-size", type=int, default=8, help="images per captioner call (hf:)")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="captioner generation length (hf:)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"),
                        help="captioner dtype (hf:)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the hub model's own code (hf:)")
    parser.add_argument("--skip-empty", action="store_true", help="skip (and count) images with empty captions")


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


def _nothing_generated(result: Any, window: str, default_window: str) -> str:
    """The error for an augment run that generated no triplet: the window, the gallery's size, the fix."""
    s = result.summary
    return explain(f"augment generated no triplets from {s['images']} images ({s['unique_images']} after merging "
                   "duplicates)", got=result.why_empty(window),
                   fix=f"pass a window as fractions of N, e.g. --rank-window {default_window} (or -1 for any "
                       "partner), check the captioner, or pass --allow-empty to write an empty file anyway")


def _pair_encoder(args: argparse.Namespace) -> Any:
    encoder = model_from_factory(args, spec=args.pair_encoder)
    if args.device is not None and callable(getattr(encoder, "to", None)):
        encoder = encoder.to(args.device)
    return encoder


def run(args: argparse.Namespace) -> int:
    from ..positives.annotations import atomic_write_json, write_generated_cirr, write_generated_fashioniq
    from ..positives.augmenter import TripletAugmenter
    from ..recipes.run import training_pool

    fashion = args.dataset == "fashioniq"
    defaults = RECIPE_DEFAULTS[args.dataset]
    window = args.rank_window or defaults["rank_window"]
    refer = defaults["refer"] if args.refer is None else args.refer
    if args.words is None:
        args.words = defaults["words"]
    # FashionIQ: the three categories' training images are one pool (partners ranked over all of them, as the
    # release does); --category restricts the run to one
    categories = [args.category] if not fashion or args.category else list(CATEGORIES)
    splits = [load_dataset(args, category=c) for c in categories]
    pool = training_pool(splits)
    if fashion:
        args.categories = pool.categories  # the hf: prompt names each image's own category
    captioner = build_captioner(args.captioner, args)
    out = Path(args.out)
    augmenter = TripletAugmenter(
        captioner, _pair_encoder(args), templates=args.templates or ("fashioniq" if fashion else "cirr"),
        rank_window=window, partners_per_image=args.partners, seed=args.seed, dedup=not args.no_dedup,
        near_duplicate_threshold=args.near_duplicate_threshold, refer_only=refer,
        max_triplets=args.max_triplets, cache_dir=args.cache_dir or f"{out}.cache", batch_size=args.batch_size,
        caption_batch_size=args.caption_batch_size, max_tokens=args.max_tokens, skip_empty=args.skip_empty,
        show_progress=show_progress(args))
    unreadable = [i for s in splits for i in s.info.get("unreadable", [])]
    result = augmenter.augment(pool.image_ids, pool.images, pool.triplets)
    triplets = result.triplets
    if not triplets and not args.allow_empty:
        raise DataError(_nothing_generated(result, window, defaults["rank_window"]))
    if fashion:
        write_generated_fashioniq(triplets, out)
    else:
        write_generated_cirr(triplets, out, first_pair_id=args.first_pair_id)
    summary = {"dataset": args.dataset, "split": args.split, "categories": categories if fashion else None,
               "captioner": captioner.name, "out": str(out), "rank_window": window, "refer_only": refer,
               "words": args.words, "unreadable_skipped": unreadable,
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
