"""``cir-plugins augment``: generate triplets for a training split from the command line.

    cir-plugins augment --dataset cirr --root data/CIRR --split train \\
        --captioner hf:llava-hf/llava-1.5-7b-hf --pair-encoder my_model.py:build --out generated.json
    cir-plugins augment ... --recipe clip4cir-cirr  # the paper's settings, as its release runs them
    cir-plugins augment ... --rewriter hf:Qwen/Qwen2.5-1.5B-Instruct  # texts rewritten by cp.LLMRewriter

Captioners: ``hf:<hub name or local path>``, ``file:<captions.json|.jsonl>``, ``synthetic[:noise]`` (the
synthetic world's scene captions, from ``--root``). The pair encoder is a factory spec returning a callable
images (n, C, H, W) -> (n, D) or a model with ``encode_image``. The output is in the dataset's annotation
schema (CIRR for cirr/synthetic, FashionIQ for fashioniq); ``<out>.summary.json`` holds the printed summary.

The defaults are the recommended recipe, "ours, no rewrite" (the README says what each setting is);
``--recipe NAME`` takes every generation setting from a recipe instead, its partner pool included (the images
the annotated triplets name, as the release ranks; the summary's ``pool``). FashionIQ ranks its three
categories' training images together, as the release does (``--category`` restricts a run to one), each
captioned with its own category in the prompt. Under torchrun (same arguments on every rank, one
``--cache-dir``; ``--device cuda`` is each rank's GPU) each rank embeds, pairs and captions a share (into
``captions-<name>.rank<r>-of-<w>.jsonl`` beside the cache); rank 0 merges, rewrites and writes exactly what one
process would. A killed run resumes from the caches, with any number of ranks.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data.fashioniq import CATEGORIES
from ..errors import ConfigError, DataError, explain
from ..positives.augmenter import AugmentConfig
from ._common import (
    LONG_TEXT,
    add_dataset_arguments,
    add_device_argument,
    add_factory_arguments,
    add_progress_argument,
    load_dataset,
    model_from_factory,
    show_progress,
)

__all__ = ["configure", "run", "build_captioner", "build_rewriter", "DEFAULT_RANK_WINDOWS", "RECOMMENDED"]


def _recipe_defaults() -> dict[str, dict[str, Any]]:
    """Per dataset, its default recipe's window (fractions of its pool), refer-only and word budget."""
    from ..recipes import default_recipe

    out = {}
    for dataset in ("cirr", "fashioniq"):
        generation = default_recipe(dataset).generation
        low, high = generation.window_fractions(dataset)
        out[dataset] = {"rank_window": f"{low},{high}", "refer": generation.refer_only, "words": generation.words}
    out["synthetic"] = dict(out["cirr"])
    return out


RECIPE_DEFAULTS = _recipe_defaults()
# the release's --rank-window by dataset (what --recipe with the dataset's default recipe gives)
RELEASE_RANK_WINDOWS = {dataset: d["rank_window"] for dataset, d in RECIPE_DEFAULTS.items()}
# the library's recommended recipe, "ours, no rewrite": augment's defaults, read from AugmentConfig's own
_RECOMMENDED = AugmentConfig()
RECOMMENDED = {"name": "ours, no rewrite", "rank_window": ",".join(str(v) for v in _RECOMMENDED.rank_window),
               "partners": _RECOMMENDED.partners_per_image, "refer": _RECOMMENDED.refer_only,
               "keep_equal_captions": _RECOMMENDED.keep_equal_captions, "long_text": _RECOMMENDED.fallback,
               "rewriter": None}
# --rank-window by dataset when no --recipe is given
DEFAULT_RANK_WINDOWS = {dataset: RECOMMENDED["rank_window"] for dataset in RECIPE_DEFAULTS}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Generate triplets for a training split. Defaults: the library's recommended recipe, "
                          "'ours, no rewrite' (a partner from the nearest 1% of each image's ranking, one per image, "
                          "the dataset's templates, over-long texts replaced by the target caption); --recipe NAME "
                          "takes the paper's settings from a recipe instead.")
    add_dataset_arguments(parser)
    parser.add_argument("--recipe", default=None, metavar="NAME",
                        help="take the generation defaults from this recipe (the paper's, as its release runs them, "
                             "e.g. clip4cir-cirr; `cir-plugins recipe list`) instead of the recommended recipe; "
                             "flags given explicitly still win")
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
                             f"{RECOMMENDED['rank_window']} (the nearest 1%%, the recommended recipe); with --recipe "
                             "the recipe's window as a fraction of its pool, the images the annotated triplets "
                             "name (the release's: "
                             + ", ".join(f"{d} {w}" for d, w in RELEASE_RANK_WINDOWS.items()) + ")")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the file and exit 0 even when no triplet was generated (default: an error)")
    parser.add_argument("--partners", type=int, default=None, help="partners per image (default: 1, or the recipe's)")
    parser.add_argument("--templates", action="append", default=None,
                        help="preset (cirr, fashioniq, all) or a template with {reference}/{target}; repeatable "
                             "(default: fashioniq for FashionIQ, else cirr; with --recipe the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refer", action=argparse.BooleanOptionalAction, default=None,
                        help="only images that are references of annotated triplets get partners (default: off, "
                             "every image gets a partner; with --recipe the recipe's: on for FashionIQ's)")
    parser.add_argument("--keep-equal-captions", action=argparse.BooleanOptionalAction, default=None,
                        help="keep pairs whose two captions are equal, as the release does (FashionIQ's '{target}' "
                             "text is still valid) (default: dropped and counted; with --recipe kept)")
    parser.add_argument("--max-triplets", type=int, default=None,
                        help="subsample to at most this many triplets (default: all, or the recipe's)")
    parser.add_argument("--near-duplicate-threshold", type=float, default=None,
                        help="also merge images whose pair-encoder cosine is at least this")
    parser.add_argument("--no-dedup", action="store_true", help="do not merge pixel-identical images")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="longest text, in the pair encoder's tokenizer's tokens when it has one, else in words "
                             "(default: the limit the pair encoder exposes, as text_limit_of reads it; else none here, "
                             "and stage1/stage2 apply the CIR model's)")
    parser.add_argument("--long-text", default=None, choices=LONG_TEXT,
                        help="a text over the limit: 'target' = the target caption alone, as the release does "
                             "(default), 'truncate' = its leading words that fit, 'keep' = no limit")
    parser.add_argument("--cache-dir", default=None, help="caption and rewrite cache folder (default: <out>.cache)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per pair-encoder call")
    parser.add_argument("--words", type=int, default=None,
                        help="k in the prompt 'describe ... in {k} words' (hf:; default: the dataset's recipe, "
                             + ", ".join(f"{d} {v['words']}" for d, v in RECIPE_DEFAULTS.items()) + ")")
    add_captioner_arguments(parser)
    add_rewriter_arguments(parser)
    parser.add_argument("--out", required=True, help="annotation JSON to write")
    parser.add_argument("--first-pair-id", type=int, default=10_000_000, help="first pairid of generated CIRR records")
    add_progress_argument(parser)


def add_captioner_arguments(parser: argparse.ArgumentParser) -> None:
    """The captioner flags :func:`build_captioner` reads besides the spec (for augment and recipe run)."""
    parser.add_argument("--caption-batch-size", type=int, default=8, help="images per captioner call (hf:)")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="captioner generation length (hf:)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"),
                        help="captioner dtype (hf:)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the hub model's own code (hf:)")
    parser.add_argument("--skip-empty", action="store_true", help="skip (and count) images with empty captions")


def add_rewriter_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags :func:`build_rewriter` reads."""
    parser.add_argument("--rewriter", default=None, metavar="SPEC",
                        help="rewrite each pair's texts with a chat model: hf:<hub name or local path>, or a local "
                             "model folder, e.g. hf:Qwen/Qwen2.5-1.5B-Instruct (default: none, template texts; with "
                             "--recipe the recipe's)")
    parser.add_argument("--rewriter-examples", type=int, default=0, metavar="K",
                        help="in-context examples for the rewriter: K annotated triplets of the split whose images are "
                             "captioned for it (0 = the built-in examples, default)")
    parser.add_argument("--rewriter-max-words", type=int, default=20,
                        help="longest rewritten text in words; a longer answer keeps the template texts (default: 20)")
    parser.add_argument("--rewriter-batch-size", type=int, default=8, help="pairs per rewriter call (default: 8)")
    parser.add_argument("--rewriter-max-new-tokens", type=int, default=40, help="rewriter generation length")
    parser.add_argument("--rewriter-dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"),
                        help="rewriter dtype")


def build_rewriter(spec: str, args: argparse.Namespace, examples: Any = None) -> Any:
    """A rewriter from ``--rewriter`` and its flags (see :func:`cir_plugins.positives.rewriters.rewriter_from_spec`)."""
    from ..positives.rewriters import rewriter_from_spec

    return rewriter_from_spec(spec, examples=examples, max_words=args.rewriter_max_words,
                              batch_size=args.rewriter_batch_size, max_new_tokens=args.rewriter_max_new_tokens,
                              device=args.device or "cpu", dtype=args.rewriter_dtype, seed=args.seed,
                              trust_remote_code=args.trust_remote_code)


def _rewriter_examples(args: argparse.Namespace, captioner: Any, pool: Any, cache_path: Any) -> Any:
    """``--rewriter-examples K`` annotated triplets (by ``--seed``, captioned into the cache), or None."""
    import random

    from ..positives.captioners import caption_images
    from ..positives.rewriters import examples_from_triplets

    k = args.rewriter_examples
    if k <= 0:
        return None
    annotated = [t for t in pool.triplets if t.texts and t.target is not None]
    if len(annotated) < k:
        raise ConfigError(explain(f"--rewriter-examples {k}: the split has {len(annotated)} annotated triplets",
                                  fix="ask for fewer examples, or 0 for the built-in ones"))
    picked = random.Random(args.seed).sample(annotated, k)
    ids = list(dict.fromkeys(i for t in picked for i in (t.reference, t.target)))
    captions = caption_images(captioner, ids, pool.images, cache_path=cache_path,
                              batch_size=args.caption_batch_size, skip_empty=True, show_progress=False).captions
    return examples_from_triplets(picked, captions, k=k, seed=args.seed)


def _generation_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The generation settings of the run before explicit flags: the recommended recipe, or ``--recipe``'s."""
    dataset_templates = "fashioniq" if args.dataset == "fashioniq" else "cirr"
    if args.recipe is None:
        return {**RECOMMENDED, "templates": [dataset_templates], "words": RECIPE_DEFAULTS[args.dataset]["words"],
                "max_triplets": None, "recipe": None}
    from ..recipes import load_recipe

    recipe = load_recipe(args.recipe)
    if recipe.dataset != args.dataset and not (args.dataset == "synthetic" and recipe.dataset == "cirr"):
        raise ConfigError(explain(f"recipe {recipe.name} is for {recipe.dataset}", got=args.dataset,
                                  fix=f"pass --dataset {recipe.dataset} or a recipe of {args.dataset}"))
    generation = recipe.generation
    window = generation.window_fractions(recipe.dataset)
    return {"name": recipe.name, "rank_window": f"{window[0]},{window[1]}" if window else "-1",
            "partners": generation.partners_per_image, "refer": generation.refer_only,
            "keep_equal_captions": generation.keep_equal_captions,
            "long_text": "target", "rewriter": getattr(generation, "rewriter", None),
            "templates": list(generation.templates), "words": generation.words, "max_triplets": generation.max_triplets,
            "recipe": recipe}


def _length_policy(args: argparse.Namespace, encoder: Any, long_text: str) -> dict[str, Any]:
    """TripletAugmenter's max_tokens / count_tokens / fallback for ``--max-tokens`` and ``--long-text``."""
    from ..positives.templates import text_limit_of

    if long_text == "keep":
        return {}
    found = text_limit_of(encoder)
    if args.max_tokens is not None:
        return {"fallback": long_text, "max_tokens": args.max_tokens, "count_tokens": found.get("count_tokens")}
    return {"fallback": long_text, **found} if found else {}


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
                           dtype=args.dtype, max_new_tokens=args.max_new_tokens, batch_size=args.caption_batch_size,
                           skip_empty=args.skip_empty, trust_remote_code=args.trust_remote_code)
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
                       "partner), --keep-equal-captions, check the captioner, or pass --allow-empty to write an "
                       "empty file anyway")


def _pair_encoder(args: argparse.Namespace) -> Any:
    encoder = model_from_factory(args, spec=args.pair_encoder)
    if args.device is not None and callable(getattr(encoder, "to", None)):
        encoder = encoder.to(args.device)
    return encoder


def run(args: argparse.Namespace) -> int:
    from .._atomic import atomic_write_json
    from ..positives.annotations import write_generated_cirr, write_generated_fashioniq
    from ..positives.augmenter import TripletAugmenter
    from ..recipes.run import pool_ids, training_pool
    from ..training.loop import distributed_rank

    rank, world = distributed_rank()  # joins the torchrun job, if any (1 process: 0, 1)
    fashion = args.dataset == "fashioniq"
    defaults = _generation_defaults(args)
    window = args.rank_window or defaults["rank_window"]
    refer = defaults["refer"] if args.refer is None else args.refer
    keep_equal = defaults["keep_equal_captions"] if args.keep_equal_captions is None else args.keep_equal_captions
    long_text = args.long_text or defaults["long_text"]
    rewriter_spec = args.rewriter or defaults["rewriter"]
    args.words = defaults["words"] if args.words is None else args.words
    # FashionIQ: the three categories' training images are one pool, as the release ranks them
    categories = [args.category] if not fashion or args.category else list(CATEGORIES)
    splits = [load_dataset(args, category=c) for c in categories]
    pool = training_pool(splits)
    if fashion:
        args.categories = pool.categories  # the hf: prompt names each image's own category
    captioner = build_captioner(args.captioner, args)
    out = Path(args.out)
    encoder = _pair_encoder(args)
    cache_dir = Path(args.cache_dir or f"{out}.cache")
    rewriter = None
    if rewriter_spec and rank == 0:  # rank 0 alone rewrites
        from ..positives.captioners import cache_file_name

        examples = _rewriter_examples(args, captioner, pool, cache_dir / cache_file_name(captioner.name))
        rewriter = build_rewriter(rewriter_spec, args, examples)
    length = _length_policy(args, encoder, long_text)
    config = AugmentConfig(
        templates=args.templates or defaults["templates"], rank_window=window, seed=args.seed,
        partners_per_image=defaults["partners"] if args.partners is None else args.partners,
        dedup=not args.no_dedup, near_duplicate_threshold=args.near_duplicate_threshold, refer_only=refer,
        max_triplets=defaults["max_triplets"] if args.max_triplets is None else args.max_triplets,
        max_tokens=length.get("max_tokens"), fallback=length.get("fallback", "target"), keep_equal_captions=keep_equal,
        skip_empty=args.skip_empty, batch_size=args.batch_size, caption_batch_size=args.caption_batch_size)
    augmenter = TripletAugmenter(captioner, encoder, config=config, rewriter=rewriter,
                                 count_tokens=length.get("count_tokens"), cache_dir=cache_dir,
                                 show_progress=show_progress(args))
    unreadable = [i for s in splits for i in s.info.get("unreadable", [])]
    # the images ranked: every training image, or the recipe's pool (the one its window's fractions refer to)
    ranked = pool.image_ids if defaults["recipe"] is None else pool_ids(defaults["recipe"], pool)
    result = augmenter.augment(ranked, pool.images, pool.triplets, shard=(rank, world) if world > 1 else None)
    if result is None:  # not rank 0: its share is in the merged cache; rank 0 writes everything
        return 0
    triplets = result.triplets
    if not triplets and not args.allow_empty:
        raise DataError(_nothing_generated(result, window, defaults["rank_window"]))
    if fashion:
        write_generated_fashioniq(triplets, out)
    else:
        write_generated_cirr(triplets, out, first_pair_id=args.first_pair_id)
    summary = {"dataset": args.dataset, "split": args.split, "categories": categories if fashion else None,
               "recipe": defaults["name"], "captioner": captioner.name, "out": str(out), "rank_window": window,
               "pool": {"kind": "all" if defaults["recipe"] is None else defaults["recipe"].generation.pool,
                        "images": len(ranked)},
               "refer_only": refer, "keep_equal_captions": keep_equal, "long_text": long_text, "words": args.words,
               "unreadable_skipped": unreadable, **result.summary}
    atomic_write_json(f"{out}.summary.json", summary)
    s, c = result.summary, result.summary["captions"]
    print(f"images {s['images']} | duplicate groups {s['duplicate_groups']} ({s['duplicates_merged']} merged) | "
          f"captions {c['new']} new, {c['cached']} cached, {c['skipped']} skipped | "
          f"pairs {s['pairs']} | same-caption skipped {s['skipped_same_caption']}, kept {s['kept_same_caption']} | "
          f"triplets {s['triplets']}" + (f" | ranks {world}" if world > 1 else ""))
    limit = s["text_limit"]
    print(f"recipe: {defaults['name']} | ranked among {summary['pool']['images']} images "
          f"({summary['pool']['kind']}) | texts over the limit: "
          + (f"{s['text_fallbacks']} ({'replaced by the target caption' if limit['fallback'] == 'target' else 'cut'}; "
             f"limit {limit['max_tokens']} tokens)" if limit else
             "not checked (no tokenizer limit known: pass --max-tokens, or stage1/stage2 apply the CIR model's)"))
    if (r := s["rewrite"]) is not None:
        print(f"rewrite ({r['rewriter']}): {r['rewritten']} pairs rewritten, {r['fallback']} kept their template "
              f"texts {r['reasons'] or ''} | answers {r['new']} new, {r['cached']} cached")
    print("seconds: " + ", ".join(f"{step} {sec:.2f}" for step, sec in s["seconds"].items()))
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable images (listed in the summary), e.g. {unreadable[:3]}")
    print(f"wrote {len(triplets)} generated triplets to {out}")
    return 0
