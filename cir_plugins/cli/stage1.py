"""``cir-plugins stage1``: contrastive fine-tuning with in-batch negatives (the base model's own recipe).

Example::

    cir-plugins stage1 --model my_model.py:build --dataset cirr --root /data/cirr --out runs/stage1 \
        --val-split val --epochs 3 [--generated runs/generated.json] [--generated-only]

Both towers train unless ``--trainable PREFIX`` names the parameters (repeatable). ``--dedup`` (or
``--groups``) makes pixel-identical targets of a batch one row. ``--generated-only`` trains on the
generated triplets alone (the zero-shot variant). Every :class:`~cir_plugins.Stage1Config` field is a
flag. Then: ``cir-plugins build-bank --model ... --trained runs/stage1`` and ``cir-plugins stage2
--model ... --trained runs/stage1``.
"""

from __future__ import annotations

import argparse
import logging

from ..training.config import Stage1Config
from ._common import (
    add_groups_arguments,
    add_training_arguments,
    build_model,
    config_from_args,
    fit_and_report,
    load_dataset,
    made_with,
    read_groups,
    show_progress,
    training_triplets,
    val_evaluator,
)
from ._long_text import add_long_text_argument, fit_generated

__all__ = ["configure", "run"]

logger = logging.getLogger(__name__)


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
