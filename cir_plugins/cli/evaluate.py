"""``cir-plugins evaluate`` and ``cir-plugins submit``: the console side of :mod:`cir_plugins.evaluation`.

    cir-plugins evaluate --model my_model.py:build --dataset fashioniq --root /data/fiq --category all
    cir-plugins submit --model my_model.py:build --root /data/cirr --out-dir submission/
"""

from __future__ import annotations

import argparse
from typing import Any

from .._atomic import atomic_write_json
from ..errors import ConfigError, explain
from ._common import (
    CATEGORIES,
    add_dataset_arguments,
    add_model_arguments,
    add_progress_argument,
    build_model,
    load_dataset,
    show_progress,
)

__all__ = ["configure_evaluate", "run_evaluate", "configure_submit", "run_submit"]


def _common(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    add_progress_argument(parser)


def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser, default_split="val", many_categories=True)
    _common(parser)
    parser.add_argument("--remove-reference", choices=("auto", "yes", "no"), default="auto",
                        help="remove the reference from the gallery (auto: CIRR yes, FashionIQ no, the standard "
                             "protocol; FashionIQ yes: the method's release for its CLIP4Cir and zero-shot rows)")
    parser.add_argument("--output", default=None, help="also write the result dict as JSON here")


def configure_submit(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser, default_split="test1", default_dataset="cirr")
    _common(parser)
    parser.add_argument("--out-dir", required=True, help="folder for the two server files")
    parser.add_argument("--name", default="cirr", help="suffix of the file names")


def _table(result: dict) -> str:
    """One row per metric (recalls in percent, two decimals), then the counts as integers."""
    rows = [f"{key:>12}  {value:7.2f}" for key, value in result.items()
            if isinstance(value, float) and not key.startswith("n_")]
    rows += [f"{key:>12}  {int(value):7d}" for key, value in result.items()
             if key.startswith("n_") and isinstance(value, (int, float))]
    return "\n".join(rows)


def run_evaluate(args: argparse.Namespace) -> int:
    """Load the split(s), evaluate, print a table (and write JSON with --output)."""
    from ..evaluation import evaluate

    model = build_model(args)
    if args.dataset == "fashioniq":
        wanted = args.category or ["all"]
        categories = list(CATEGORIES) if wanted == ["all"] else wanted
        if unknown := [c for c in categories if c not in CATEGORIES]:
            raise ConfigError(explain("unknown FashionIQ category", got=unknown, expected=CATEGORIES + ("all",)))
        splits = [load_dataset(args, category=c) for c in categories]
        split: Any = splits if len(splits) > 1 else splits[0]
    else:
        if args.category:
            raise ConfigError(explain("--category is only for FashionIQ", got=args.category))
        split = load_dataset(args)
    if dropped := sum(s.info.get("queries_dropped", 0) for s in (split if isinstance(split, list) else [split])):
        print(f"--skip-unreadable dropped {dropped} queries: these numbers are not comparable with the full split's")
    remove = {"auto": None, "yes": True, "no": False}[args.remove_reference]
    result = evaluate(model, split, batch_size=args.batch_size, device=args.device,
                      show_progress=show_progress(args), remove_reference=remove)
    protocol = result["protocol"]
    print(f"{args.dataset} {args.split}: protocol {protocol['name']}, "
          f"reference removed: {protocol['reference_removed']}")
    if isinstance(split, list):
        for category in protocol["categories"]:
            print(f"[{category}]\n{_table(result[category])}")
        print(f"[average]\n{_table(result)}")
    else:
        print(_table(result))
    if args.output:
        atomic_write_json(args.output, result, indent=1, make_parents=True)
        print(f"wrote {args.output}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    """Rank the CIRR test split and write the two validated server files."""
    from ..submission import submit_cirr

    if args.dataset == "fashioniq":
        raise ConfigError(explain("submit writes the CIRR test-server files", got="--dataset fashioniq",
                                  fix="use --dataset cirr (or synthetic); FashionIQ has no test server"))
    model = build_model(args)
    path_recall, path_subset = submit_cirr(model, load_dataset(args), args.out_dir, batch_size=args.batch_size,
                                           device=args.device, show_progress=show_progress(args), name=args.name)
    print(f"wrote {path_recall}\nwrote {path_subset}")
    return 0
