"""``cir-plugins show``: what a model retrieves on a split (CIRR, FashionIQ with one ``--category``, the synthetic
world), as an HTML page and a PNG grid (:func:`cir_plugins.report.retrieval_report`): per query the reference, the
text, the top-``k`` (the target outlined) and the target's rank; ``--compare`` (a second factory) or
``--compare-trained`` (other weights) puts a second model beside it, with the queries the first wins and loses.

    cir-plugins show --model my_model.py:build --trained runs/stage2 --compare-trained runs/stage1 \\
        --dataset fashioniq --category dress --root /data/fiq --out show/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.fashioniq import CATEGORIES
from ..errors import ConfigError, explain
from ._common import (
    add_dataset_arguments,
    add_model_arguments,
    add_progress_argument,
    build_model,
    load_dataset,
    show_progress,
)

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser, default_split="val")
    add_model_arguments(parser)
    parser.add_argument("--compare", default=None, metavar="SPEC",
                        help="a second model's factory spec (same --factory-kwargs), shown beside the first")
    parser.add_argument("--compare-trained", action="append", default=None, metavar="PATH",
                        help="trained result(s) for the second model (as --trained); without --compare the second "
                             "model is --model with these weights")
    parser.add_argument("--names", nargs=2, default=None, metavar=("FIRST", "SECOND"),
                        help="labels of the two models (default: model / compare)")
    parser.add_argument("--out", required=True, help="folder for report.html, report.png and report.json")
    parser.add_argument("--k", type=int, default=5, help="candidates shown per query (default: 5)")
    parser.add_argument("--queries", type=int, default=8,
                        help="queries shown: half the first model's biggest wins and half its losses with a second "
                             "model, else the best and worst ranked (default: 8)")
    parser.add_argument("--query-index", type=int, action="append", default=None, metavar="I",
                        help="show this query (index in the split; repeatable) instead of choosing")
    parser.add_argument("--faiss", default=None, metavar="PATH",
                        help="a FAISS index saved from a bank of this split's gallery: the first model's shown top-k "
                             "come from searching it (ranks stay exact)")
    parser.add_argument("--batch-size", type=int, default=64)
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Load the split and the model(s), write the report, print where it is and the comparison's counts."""
    from ..report import retrieval_report

    if args.dataset == "fashioniq" and not args.category:
        raise ConfigError(explain("FashionIQ needs --category", expected=CATEGORIES,
                                  fix="pass --category dress (one category per report)"))
    for flag, value in (("--k", args.k), ("--queries", args.queries), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(explain(f"{flag} must be >= 1", got=value))
    model = build_model(args)  # first: it reads the --trained results, which load_dataset then reuses
    split = load_dataset(args)
    other = None
    if args.compare or args.compare_trained:
        other = build_model(argparse.Namespace(**{**vars(args), "model": args.compare or args.model,
                                                  "trained": args.compare_trained}))
    from ..negatives.faiss_index import FaissIndex

    index = FaissIndex.load(args.faiss) if args.faiss else None
    names = tuple(args.names) if args.names else ("model", "compare")
    result = retrieval_report(model, split, Path(args.out), compare=other, names=names, k=args.k,
                              n_queries=args.queries, queries=args.query_index, batch_size=args.batch_size,
                              device=args.device, show_progress=show_progress(args), index=index,
                              title=f"{args.dataset} {args.split}{' ' + args.category if args.category else ''}: "
                                    f"top {args.k} of {names[0]}" + (f" vs {names[1]}" if other is not None else ""))
    hits = sum(r < args.k for r in result.ranks) / len(result.ranks) * 100
    print(f"{args.dataset} {args.split}: {len(result.ranks)} queries, target in the top {args.k} of {names[0]}: "
          f"{hits:.1f}%")
    if other is not None:
        print(f"{names[0]} ranks the target better than {names[1]} on {len(result.wins)} queries, worse on "
              f"{len(result.losses)}")
    print(f"report: {result.html}\npicture: {result.png}\nranks: {result.json}")
    return 0
