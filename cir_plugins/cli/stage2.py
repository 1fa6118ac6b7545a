"""``cir-plugins stage2``: fine-tune the query side of a model against a saved bank (the README's command sequence).

``--trained`` puts a stage-1 result on the model first (build the bank from the same model). With ``--val-split``
the best epoch (``--select-metric``) is kept as ``{out}/checkpoints/best``; ``--resume`` continues
``{out}/checkpoints/last``; every :class:`~cir_plugins.Stage2Config` field is a flag. Evaluate the result with
``--trained runs/stage1 --trained runs/stage2``.
"""

from __future__ import annotations

import argparse

from ..training.config import Stage2Config
from ._common import (
    add_long_text_argument,
    add_training_arguments,
    build_model,
    config_from_args,
    fit_and_report,
    fit_generated,
    load_dataset,
    made_with,
    show_progress,
    training_triplets,
    val_evaluator,
)

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, Stage2Config)
    parser.add_argument("--bank", required=True, help="bank file from cir-plugins build-bank")
    add_long_text_argument(parser)


def run(args: argparse.Namespace) -> int:
    from .._utils import model_device
    from ..negatives.bank import NegativeBank
    from ..training.stage2 import Stage2Trainer

    model = build_model(args)
    split = load_dataset(args)
    triplets = fit_generated(args, model, training_triplets(args, split))
    bank = NegativeBank.load(args.bank, device=model_device(model))
    config = config_from_args(Stage2Config, args, output_dir=args.out, show_progress=show_progress(args))
    trainer = Stage2Trainer(model, bank, triplets, split.images, config=config, evaluator=val_evaluator(args),
                            made_with=made_with(args),
                            allow_preprocessing_mismatch=bool(getattr(args, "allow_provenance_mismatch", False)))
    return fit_and_report(trainer, args)
