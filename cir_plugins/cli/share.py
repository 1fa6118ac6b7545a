"""``cir-plugins share``: a trained result as a folder to publish (:func:`cir_plugins.share.save_trained`).

    cir-plugins share --trained runs/stage2 --on-top-of runs/stage1 --bank runs/bank.safetensors \
        --evaluation "CIRR val=runs/val.json" --base-model my_model:build --out share/my-model \
        --push me/my-model

Each ``--evaluation [NAME=]FILE`` (``evaluate --output``; NAME defaults to the file's stem) is a row of the model
card's table. ``--push`` uploads the folder with huggingface_hub (the ``hub`` extra; a token from ``HF_TOKEN`` or
``huggingface-cli login``), private unless ``--public``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import read_json_file

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trained", required=True, help="the result to share: a stage-1/stage-2 output folder (its "
                                                         "best checkpoint) or a checkpoint folder")
    parser.add_argument("--on-top-of", action="append", default=[], metavar="RESULT",
                        help="an earlier result this one was trained on (e.g. the stage-1 folder), merged under it "
                             "so one load reproduces the model (repeatable, in training order)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default=None,
                        help="which checkpoint of --trained (default: best when the run selected one)")
    parser.add_argument("--bank", default=None, help="the stage-2 bank file: its fingerprints go in the card")
    parser.add_argument("--evaluation", action="append", default=[], metavar="[NAME=]FILE",
                        help="an evaluation JSON (cir-plugins evaluate --output) for the card's table (repeatable)")
    parser.add_argument("--base-model", default=None, help="how to build the base model (e.g. my_model:build)")
    parser.add_argument("--name", default=None, help="the model card's title")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--push", default=None, metavar="REPO_ID", help="then upload it to the Hub as REPO_ID")
    parser.add_argument("--public", action="store_true", help="with --push: a public repository")


def _evaluation(specs: list[str]) -> dict[str, dict]:
    table = {}
    for spec in specs:
        name, _, file = spec.rpartition("=")
        table[name or Path(file).stem] = read_json_file(
            file, "the evaluation file", expected="a JSON object of metrics",
            fix="pass a JSON file written by cir-plugins evaluate --output")
    return table


def run(args: argparse.Namespace) -> int:
    from ..share import check_repo_id, push_to_hub, save_trained

    if args.push is not None:
        check_repo_id(args.push)  # before anything is written
    from ..negatives.bank import NegativeBank

    bank = NegativeBank.load(args.bank) if args.bank else None
    folder = save_trained(args.trained, args.out, on_top_of=args.on_top_of, bank=bank,
                          evaluation=_evaluation(args.evaluation) or None, base_model=args.base_model,
                          name=args.name, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"wrote {folder} (weights.safetensors, cir_plugins.json, README.md); "
          f"load it with --trained {folder} or cp.load_trained(model, {str(folder)!r})")
    if args.push is not None:
        print(f"uploaded to {push_to_hub(folder, args.push, private=not args.public)}")
    return 0
