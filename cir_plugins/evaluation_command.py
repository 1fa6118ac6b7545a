"""``cir-plugins evaluate`` and ``cir-plugins submit``: the console side of :mod:`cir_plugins.evaluation`.

The model is named by a factory spec (``file.py:function`` or ``pkg.module:function``) whose
function returns a CIR model; ``--factory-kwargs`` passes it JSON keyword arguments.

Examples::

    cir-plugins evaluate --model my_model.py:build --dataset cirr --root /data/cirr --split val
    cir-plugins evaluate --model my_model.py:build --dataset fashioniq --root /data/fiq --category all
    cir-plugins evaluate --model my_model.py:build --dataset synthetic --root /data/world --split test
    cir-plugins submit --model my_model.py:build --root /data/cirr --out-dir submission/
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_json
from ._cli_common import add_factory_arguments, model_from_factory
from .errors import ConfigError, explain

__all__ = ["configure_evaluate", "run_evaluate", "configure_submit", "run_submit"]

logger = logging.getLogger(__name__)

CATEGORIES = ("dress", "shirt", "toptee")


def _common(parser: argparse.ArgumentParser) -> None:
    add_factory_arguments(parser)
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: the model's device)")
    parser.add_argument("--transform", default="clip", choices=("clip", "targetpad", "squarepad", "none"),
                        help="image preprocessing")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cir-plugins evaluate``."""
    _common(parser)
    parser.add_argument("--dataset", required=True, choices=("cirr", "fashioniq", "synthetic"))
    parser.add_argument("--split", default="val", help="split name on disk (default: val)")
    parser.add_argument("--category", action="append", default=None,
                        help="FashionIQ category (repeatable) or 'all' (default: all)")
    parser.add_argument("--remove-reference", choices=("auto", "yes", "no"), default="auto",
                        help="remove the reference from the gallery (auto: CIRR yes, FashionIQ no)")
    parser.add_argument("--output", default=None, help="also write the result dict as JSON here")


def configure_submit(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cir-plugins submit``."""
    _common(parser)
    parser.add_argument("--split", default="test1", help="CIRR split to rank (default: test1)")
    parser.add_argument("--out-dir", required=True, help="folder for the two server files")
    parser.add_argument("--name", default="cirr", help="suffix of the file names")


def _table(result: dict) -> str:
    rows = [f"{key:>12}  {value:7.2f}" for key, value in result.items() if isinstance(value, float)]
    return "\n".join(rows)


def run_evaluate(args: argparse.Namespace) -> int:
    """Load the split(s), evaluate, print a table (and write JSON with --output)."""
    from .data.cirr import load_cirr
    from .data.fashioniq import load_fashioniq
    from .evaluation import evaluate

    model = model_from_factory(args)
    load = dict(transform=args.transform, size=args.image_size)
    if args.dataset == "fashioniq":
        wanted = args.category or ["all"]
        categories = list(CATEGORIES) if wanted == ["all"] else wanted
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown:
            raise ConfigError(explain("unknown FashionIQ category", got=unknown, expected=CATEGORIES + ("all",)))
        splits = [load_fashioniq(args.root, c, args.split, **load) for c in categories]
        split: Any = splits if len(splits) > 1 else splits[0]
    else:
        if args.category:
            raise ConfigError(explain("--category is only for FashionIQ", got=args.category))
        split = load_cirr(args.root, args.split, **load)
    remove = {"auto": None, "yes": True, "no": False}[args.remove_reference]
    result = evaluate(model, split, batch_size=args.batch_size, device=args.device,
                      show_progress=not args.no_progress, remove_reference=remove)
    protocol = result["protocol"]
    print(f"{args.dataset} {args.split}: protocol {protocol['name']}, reference removed: "
          f"{protocol['reference_removed']}")
    if isinstance(split, list):
        for category in protocol["categories"]:
            print(f"[{category}]\n{_table(result[category])}")
        print(f"[average]\n{_table(result)}")
    else:
        print(_table(result))
    if args.output:
        atomic_write_json(Path(args.output), result, indent=1, make_parents=True)
        print(f"wrote {args.output}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    """Rank the CIRR test split and write the two validated server files."""
    from .data.cirr import load_cirr
    from .evaluation import submit_cirr

    model = model_from_factory(args)
    split = load_cirr(args.root, args.split, transform=args.transform, size=args.image_size)
    path_recall, path_subset = submit_cirr(model, split, args.out_dir, batch_size=args.batch_size,
                                           device=args.device, show_progress=not args.no_progress, name=args.name)
    print(f"wrote {path_recall}\nwrote {path_subset}")
    return 0
