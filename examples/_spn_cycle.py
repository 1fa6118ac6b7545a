"""The SPN cycle shared by the example scripts: augment -> bank -> stage 2 -> evaluate, and its command line.

Each example's ``run.py`` keeps what is its own (the loader from ``wrap.py``, the image transform, the pair
encoder that ranks partners for the generated triplets, the stage-2 defaults of its row in the method's table,
extra commands) and describes it with a :class:`CycleSpec`; everything else is here, once. Imported as
``examples._spn_cycle`` (the scripts run as ``python -m examples.<name>.run`` from the repository root).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import cir_plugins as cp
from cir_plugins.data.synthetic import COLORS, EDIT_TYPES, POSITIONS, SHAPES, SIZES, SyntheticCaptioner, make_world
from cir_plugins.recipes import load_recipe
from cir_plugins.recipes.run import reproduce

__all__ = ["TINY_WORLD", "WORLD_WORDS", "CycleSpec", "recalls", "run_cycle", "make_parser",
           "add_tiny_checkpoint_command", "add_cycle_command", "setup_logging", "run_and_report"]

# the partner window on the world, as fractions of N (it has a few hundred to a few thousand images)
CYCLE_WINDOW = (0.25, 0.75)
# a world small enough for one CPU minute; "quick" and "default" are the library's presets
TINY_WORLD = dict(n_train_triplets=24, n_train_unlabelled=24, n_val_queries=12, n_val_distractors=12,
                  n_test_queries=0, n_test_distractors=0)
# words the tiny checkpoints' tokenizers know whole (anything else splits into characters)
WORLD_WORDS = [*SHAPES, *COLORS, *SIZES, *EDIT_TYPES, *" ".join(POSITIONS).split(), "make", "it", "the", "a", "and",
               "instead", "of", "unlike", "i", "want", "to", "into", "change", "add", "remove", "move", "at"]


@dataclass(frozen=True)
class CycleSpec:
    """What one example plugs into :func:`run_cycle`.

    - ``load``: ``--model`` (Hub name or directory) -> a wrapped model meeting cir_plugins' protocol.
    - ``transform``: wrapped model -> the image transform the CIRR loader applies (PIL -> (C, H, W)).
    - ``pair_encoder``: wrapped model -> the callable ``(N, C, H, W) -> (N, D) or (N, T, D)`` the augmenter
      ranks partner images with.
    - ``stage2``: ``cp.Stage2Config`` keyword arguments of the example's row (e.g. ``temperature``,
      ``learn_temperature``); the command line fills epochs, batch size, lr, steps, seed and output folder.
    """

    load: Callable[[str], Any]
    transform: Callable[[Any], Any]
    pair_encoder: Callable[[Any], Callable]
    stage2: Mapping[str, Any] = field(default_factory=dict)


def recalls(metrics: dict) -> dict:
    """The recall entries of an ``evaluate`` result (R@K, Rs@K, Rmean), rounded to 2 decimals."""
    return {k: round(float(v), 2) for k, v in metrics.items() if k.startswith(("R@", "Rs@", "Rmean"))}


def run_cycle(args: argparse.Namespace, spec: CycleSpec, logger: logging.Logger) -> dict:
    """One SPN cycle; returns the metrics before and after stage 2 (``reproduce`` writes {out}/results.json).

    ``args`` carries model, world, world_size, data, out, epochs, batch_size, lr, steps_per_epoch, seed and
    progress (the ``cycle`` command's options); ``logger`` is the calling example's. Steps 2-4 are the library's
    ``reproduce`` with the CIRR recipe on the world (window as a share of N) and the example's stage-2 row.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = spec.load(args.model)  # wrap.py: the whole integration
    if args.data:
        root = Path(args.data)
        captioner = None
    else:
        size = TINY_WORLD if args.world_size == "tiny" else args.world_size
        root = make_world(args.world, seed=args.seed, size=size)
        captioner = SyntheticCaptioner(root)
    transform = spec.transform(model)
    train = cp.load_cirr(root, "train", transform=transform)

    # 1. the protocol dry run
    probe = list(train.triplets[:2])
    report = cp.check_model(model, train.images.batch([t.reference for t in probe]), [t.text for t in probe],
                            train.images.batch([t.target for t in probe]))
    logger.info("%s", report)
    report.raise_if_failed()

    # 2-4. more positives (generated triplets, as the CIRR recipe makes them: partners among the images the annotated
    # triplets name, appended to the annotated ones at the recipe's annotated share), more negatives (a static bank
    # of every train image), stage 2 with the example's row, evaluation on val
    recipe = load_recipe("clip4cir-cirr").on_synthetic(CYCLE_WINDOW)
    stage2 = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "steps_per_epoch": args.steps_per_epoch, **spec.stage2}
    result = reproduce(recipe, model, root, output_dir=out, captioner=captioner,
                       pair_encoder=spec.pair_encoder(model), transform=transform, stage2_overrides=stage2,
                       seed=args.seed, eval_batch_size=args.batch_size, show_progress=args.progress)
    logger.info("training triplets: %d annotated + %d generated; bank %s", result.triplets["annotated"],
                result.triplets["generated"], tuple(result.bank_shape))
    results = {"model": str(args.model), "data": str(root), "bank_shape": list(result.bank_shape),
               "triplets": {"annotated": result.triplets["annotated"],
                            "total": result.triplets["annotated"] + result.triplets["generated"]},
               "before": recalls(result.before), "after": recalls(result.after),
               "history": [{k: v for k, v in h.items() if k != "metrics"} for h in result.history]}
    return results  # {out}/results.json: reproduce's full record (recipe, per-epoch metrics, augment summary)


def make_parser(prog: str, doc: str) -> tuple[argparse.ArgumentParser, Any]:
    """The top-level parser (``-v``) and its required sub-command group; description = ``doc``'s first line."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser, parser.add_subparsers(dest="command", required=True)


def add_tiny_checkpoint_command(sub, help: str) -> argparse.ArgumentParser:
    """The ``tiny-checkpoint PATH`` command."""
    tiny = sub.add_parser("tiny-checkpoint", help=help)
    tiny.add_argument("path")
    return tiny


def add_cycle_command(sub, *, model_help: str, lr: float) -> argparse.ArgumentParser:
    """The ``cycle`` command: the options :func:`run_cycle` reads, with the example's default ``--lr``."""
    run = sub.add_parser("cycle", help="augment -> bank -> stage 2 -> evaluate")
    run.add_argument("--model", required=True, help=model_help)
    run.add_argument("--world", default="runs/world", help="synthetic world root (created if missing)")
    run.add_argument("--world-size", default="tiny", choices=("tiny", "quick", "default"))
    run.add_argument("--data", default=None, help="a real CIRR root instead of the synthetic world")
    run.add_argument("--out", required=True, help="run directory (bank, checkpoints, results.json)")
    run.add_argument("--epochs", type=int, default=3)
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--lr", type=float, default=lr)
    run.add_argument("--steps-per-epoch", type=int, default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--progress", action="store_true", help="show progress bars")
    return run


def setup_logging(verbose: bool) -> None:
    """Console logging for the scripts (the library itself never configures logging)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_and_report(args: argparse.Namespace, cycle: Callable[[argparse.Namespace], dict]) -> int:
    """Run ``cycle(args)`` and print the before / after table, the bank shape and the time; returns 0."""
    start = time.perf_counter()
    results = cycle(args)
    print(f"{'metric':<8}{'before':>9}{'after':>9}")
    for key in results["before"]:
        print(f"{key:<8}{results['before'][key]:>9.2f}{results['after'].get(key, float('nan')):>9.2f}")
    print(f"bank {tuple(results['bank_shape'])}, {results['triplets']['total']} triplets, "
          f"{time.perf_counter() - start:.1f} s; results in {Path(args.out) / 'results.json'}")
    return 0
