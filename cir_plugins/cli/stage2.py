"""``cir-plugins stage2``: fine-tune the query side of a model against a saved bank.

Example::

    cir-plugins stage2 --model my_model.py:build --bank runs/bank.safetensors --dataset cirr \
        --root /data/cirr --generated runs/generated.json --out runs/stage2 --epochs 3 --batch-size 256

``--generated`` is a JSON file of generated triplets: what ``cir-plugins augment`` writes (records in
the CIRR or FashionIQ annotation schema, recognised by their keys), or a plain list (or
``{"triplets": [...]}``) of objects with ``reference``, ``texts`` (or ``text``), ``target`` and
optionally ``source`` / ``meta``. With
``--val-split`` the model is evaluated after every epoch and the best epoch (``--select-metric``)
is kept as ``{out}/checkpoints/best``. ``--resume`` continues ``{out}/checkpoints/last``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..training.config import Stage2Config
from ._common import (add_dataset_arguments, add_model_arguments, add_progress_argument, build_model, load_dataset,
                      model_device, read_triplets)

__all__ = ["configure", "run"]

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_dataset_arguments(parser)
    parser.add_argument("--bank", required=True, help="bank file from cir-plugins build-bank")
    parser.add_argument("--generated", default=None, help="JSON file of generated triplets to mix in")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, history.json)")
    parser.add_argument("--resume", action="store_true", help="continue from {out}/checkpoints/last")
    parser.add_argument("--val-split", default=None, help="split to evaluate after each epoch (e.g. val)")
    defaults = Stage2Config()
    for name, kind in (("epochs", int), ("batch_size", int), ("lr", float), ("weight_decay", float),
                       ("temperature", float), ("warmup_steps", int), ("grad_accum_steps", int),
                       ("max_grad_norm", float), ("seed", int), ("annotated_fraction", float),
                       ("steps_per_epoch", int), ("checkpoint_every", int)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name),
                            help=f"Stage2Config.{name} (default: {getattr(defaults, name)})")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default=defaults.schedule)
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=defaults.amp)
    parser.add_argument("--learn-temperature", action="store_true")
    parser.add_argument("--no-mask-reference", action="store_true",
                        help="keep the reference row as a negative (the method's release)")
    parser.add_argument("--select-metric", default=defaults.select_metric)
    parser.add_argument("--skip-missing", action="store_true", help="drop triplets whose target is not in the bank")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..negatives.bank import NegativeBank
    from ..training.stage2 import Stage2Trainer

    model = build_model(args)
    split = load_dataset(args)
    triplets = list(split.triplets)
    if args.generated:
        triplets += read_triplets(args.generated)
    bank = NegativeBank.load(args.bank, device=model_device(model))
    config = Stage2Config(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        temperature=args.temperature, learn_temperature=args.learn_temperature, schedule=args.schedule,
        warmup_steps=args.warmup_steps, amp=args.amp, grad_accum_steps=args.grad_accum_steps,
        max_grad_norm=args.max_grad_norm, seed=args.seed,
        select_metric=args.select_metric if args.val_split else None,
        annotated_fraction=args.annotated_fraction, steps_per_epoch=args.steps_per_epoch,
        checkpoint_every=args.checkpoint_every, output_dir=args.out, skip_missing=args.skip_missing,
        show_progress=not args.no_progress, mask_reference=not args.no_mask_reference)
    evaluate = None
    if args.val_split:
        from ..evaluation import evaluate as evaluate_split

        val = load_dataset(args, split=args.val_split)
        evaluate = lambda m: evaluate_split(m, val, show_progress=not args.no_progress)  # noqa: E731
    trainer = Stage2Trainer(model, bank, triplets, split.images, config=config, evaluate=evaluate)
    history = trainer.fit(resume=args.resume)
    out = Path(args.out)
    from .._atomic import atomic_write_json

    atomic_write_json(out / "history.json", history, indent=1)
    for entry in history:
        metrics = " ".join(f"{k}={v:.2f}" for k, v in entry["metrics"].items() if isinstance(v, (int, float)))
        print(f"epoch {entry['epoch']}: loss {entry['loss']:.4f} ({entry['time']:.1f}s) {metrics}")
    return 0
