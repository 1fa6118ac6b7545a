"""SPN on the timm + BERT TIRG model (no CIR paper ships it), end to end: augment -> bank -> stage 2 -> evaluate.

Run from the repository root (see README.md for the commands):

    python -m examples.timm_tirg.run tiny-checkpoint runs/tirg_tiny
    python -m examples.timm_tirg.run cycle --model runs/tirg_tiny --world runs/world_tiny \
        --out runs/tirg_spn --world-size tiny --epochs 1

``--model`` is a checkpoint directory written by ``TimmTIRG.save_pretrained`` (make one from a
timm name and a transformers name or path with the ``init`` command); it is loaded by ``wrap.load`` (the 10-line
integration). The world is the library's synthetic CIR world
in the CIRR layout; ``--data`` points at a real CIRR root instead.
"""
from __future__ import annotations

import argparse
import logging
import sys

from examples import _spn_cycle as spn
from examples._spn_cycle import TINY_WORLD, WORLD_WORDS  # noqa: F401  (the tiny world and its vocabulary)
from examples.timm_tirg.model import TimmTIRG, make_tiny_checkpoint
from examples.timm_tirg.wrap import load

logger = logging.getLogger("examples.timm_tirg")

SPEC = spn.CycleSpec(
    load=load,
    transform=lambda model: model.image_transform(),  # timm's eval transform for the backbone
    pair_encoder=lambda model: model.embed_image,  # (N, D): the target side ranks partners
    # stage 2: text encoder + composition trained; tau 0.02 fixed as for CLIP4Cir; one D-vector per bank row
    stage2=dict(temperature=0.02, learn_temperature=False),
)


def cycle(args: argparse.Namespace) -> dict:
    """One SPN cycle; returns (and writes to {out}/results.json) the metrics before and after stage 2."""
    return spn.run_cycle(args, SPEC, logger)


def main(argv: list[str] | None = None) -> int:
    parser, sub = spn.make_parser("python -m examples.timm_tirg.run", __doc__)
    spn.add_tiny_checkpoint_command(sub, help="write a tiny random TimmTIRG checkpoint (CPU demos)")
    init = sub.add_parser("init", help="a fresh checkpoint from a timm model and a transformers text encoder")
    init.add_argument("path")
    init.add_argument("--image-model", required=True, help="timm model name, e.g. resnet50")
    init.add_argument("--text-model", required=True, help="transformers name or path, e.g. bert-base-uncased")
    init.add_argument("--pretrained", action="store_true", help="load timm's pretrained image weights")
    init.add_argument("--embed-dim", type=int, default=512)
    spn.add_cycle_command(sub, model_help="TimmTIRG checkpoint directory", lr=2e-5)
    args = parser.parse_args(argv)
    spn.setup_logging(args.verbose)
    if args.command == "tiny-checkpoint":
        path = make_tiny_checkpoint(args.path, WORLD_WORDS)
        print(f"tiny TimmTIRG checkpoint written to {path}")
        return 0
    if args.command == "init":
        model = TimmTIRG.build(args.image_model, args.text_model, pretrained=args.pretrained, embed_dim=args.embed_dim)
        print(f"TimmTIRG checkpoint written to {model.save_pretrained(args.path)}")
        return 0
    return spn.run_and_report(args, cycle)


if __name__ == "__main__":
    sys.exit(main())
