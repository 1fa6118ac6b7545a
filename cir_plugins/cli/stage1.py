"""``cir-plugins stage1``: contrastive fine-tuning with in-batch negatives (the base model's own recipe; the
README's command sequence shows it with the other steps).

Both towers train unless ``--trainable PREFIX`` (repeatable) names the parameters; pixel-identical targets of a
batch are one row (``--groups`` / ``--no-dedup`` otherwise); ``--generated-only`` trains on the generated
triplets alone (the zero-shot variant); every :class:`~cir_plugins.Stage1Config` field is a flag. Then
``build-bank`` and ``stage2`` with ``--trained runs/stage1``.
"""

from __future__ import annotations

import argparse

from ..training.config import Stage1Config
from ._common import (
    add_groups_arguments,
    add_long_text_argument,
    add_training_arguments,
    build_model,
    config_from_args,
    fit_and_report,
    fit_generated,
    load_dataset,
    made_with,
    read_groups,
    show_progress,
    training_triplets,
    val_evaluator,
)

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, Stage1Config)
    add_groups_arguments(parser)
    add_long_text_argument(parser)
    parser.add_argument("--trainable", action="append", default=None, metavar="PREFIX",
                        help="train only the parameters whose names start with PREFIX (repeatable; default: all)")
    parser.add_argument("--generated-only", action="store_true",
                        help="train on the --generated triplets alone, not the split's annotated ones")


def run(args: argparse.Namespace) -> int:
    from ..training.stage1 import Stage1Trainer

    model = build_model(args)
    split = load_dataset(args)
    triplets = fit_generated(args, model, training_triplets(args, split, annotated=not args.generated_only))
    config = config_from_args(Stage1Config, args, output_dir=args.out, show_progress=show_progress(args))
    groups = read_groups(args, split, show_progress(args))
    trainer = Stage1Trainer(model, triplets, split.images, config=config, evaluator=val_evaluator(args),
                            groups=groups, trainable=args.trainable, made_with=made_with(args))
    return fit_and_report(trainer, args)
