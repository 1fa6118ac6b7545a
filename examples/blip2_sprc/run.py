"""SPN on the SPRC-style BLIP-2 model, end to end: augment -> bank -> stage 2 -> evaluate.

Run from the repository root (see README.md for the commands):

    python -m examples.blip2_sprc.run tiny-checkpoint runs/blip2_tiny
    python -m examples.blip2_sprc.run cycle --model runs/blip2_tiny --world runs/world_tiny \
        --out runs/blip2_spn --world-size tiny --epochs 1

``--model`` is a Hub name (Salesforce/blip2-itm-vit-g) or a local checkpoint directory; it is
loaded by ``wrap.load`` (the 10-line integration). The world is the library's synthetic CIR world
in the CIRR layout; ``--data`` points at a real CIRR root instead.
"""
from __future__ import annotations

import argparse
import logging
import sys

from cir_plugins.data.images import ClipTransform
from examples import _spn_cycle as spn
from examples._spn_cycle import TINY_WORLD, WORLD_WORDS  # noqa: F401  (the tiny world and its vocabulary)
from examples.blip2_sprc.model import make_tiny_checkpoint
from examples.blip2_sprc.wrap import load

logger = logging.getLogger("examples.blip2_sprc")

def targetpad(model) -> ClipTransform:
    """SPRC's preprocessing: targetpad (aspect ratio <= 1.25), resize, centre-crop, at the checkpoint's
    own image size and normalisation."""
    settings = model.preprocess_settings()
    return ClipTransform("targetpad", settings["size"], target_ratio=1.25, mean=settings["mean"],
                         std=settings["std"])


SPEC = spn.CycleSpec(
    load=load,
    transform=targetpad,
    pair_encoder=lambda model: model.image_tokens,  # (N, 32, D): the target side ranks partners
    # stage 2: the SPRC row of the method's table (lr 1e-5, tau 0.05 learnable, batch 32, AdamW betas
    # (0.9, 0.98), weight decay 0.05); the bank holds 32 tokens per train image
    stage2=dict(temperature=0.05, learn_temperature=True, betas=(0.9, 0.98), weight_decay=0.05),
)


def cycle(args: argparse.Namespace) -> dict:
    """One SPN cycle; returns (and writes to {out}/results.json) the metrics before and after stage 2."""
    return spn.run_cycle(args, SPEC, logger)


def main(argv: list[str] | None = None) -> int:
    parser, sub = spn.make_parser("python -m examples.blip2_sprc.run", __doc__)
    spn.add_tiny_checkpoint_command(sub, help="write a tiny random BLIP-2 retrieval checkpoint (CPU demos)")
    spn.add_cycle_command(sub, model_help="Hub name or checkpoint directory", lr=1e-5)
    args = parser.parse_args(argv)
    spn.setup_logging(args.verbose)
    if args.command == "tiny-checkpoint":
        path = make_tiny_checkpoint(args.path, WORLD_WORDS)
        print(f"tiny BLIP-2 retrieval checkpoint written to {path}")
        return 0
    return spn.run_and_report(args, cycle)


if __name__ == "__main__":
    sys.exit(main())
