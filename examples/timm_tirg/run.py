"""SPN on the timm + BERT TIRG model (no CIR paper ships it), end to end: augment -> bank -> stage 2 -> evaluate.

Run from the repository root (see README.md for the commands):

    python -m examples.timm_tirg.run tiny-checkpoint runs/tirg_tiny
    python -m examples.timm_tirg.run cycle --model runs/tirg_tiny --world runs/world_tiny \
        --out runs/tirg_spn --world-size tiny --epochs 1

``--model`` is a checkpoint directory written by ``TimmTIRG.save_pretrained`` (make one from a
timm name and a transformers name or path with the ``init`` command); it is loaded by ``wrap.load`` (the 10-line integration). The world is the library's synthetic CIR world
in the CIRR layout; ``--data`` points at a real CIRR root instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

import cir_plugins as cp
from cir_plugins.data.synthetic import COLORS, EDIT_TYPES, POSITIONS, SHAPES, SIZES, SyntheticCaptioner, make_world
from examples.timm_tirg.model import TimmTIRG, make_tiny_checkpoint
from examples.timm_tirg.wrap import load

logger = logging.getLogger("examples.timm_tirg")

# a world small enough for one CPU minute; "quick" and "default" are the library's presets
TINY_WORLD = dict(n_train_triplets=24, n_train_unlabelled=24, n_val_queries=12, n_val_distractors=12,
                  n_test_queries=0, n_test_distractors=0)
# words the tiny checkpoint's tokenizer knows whole (anything else splits into characters)
WORLD_WORDS = [*SHAPES, *COLORS, *SIZES, *EDIT_TYPES, *" ".join(POSITIONS).split(), "make", "it", "the", "a", "and",
               "instead", "of", "unlike", "i", "want", "to", "into", "change", "add", "remove", "move", "at"]


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=float)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _recalls(metrics: dict) -> dict:
    return {k: round(float(v), 2) for k, v in metrics.items() if k.startswith(("R@", "Rs@", "Rmean"))}


def cycle(args: argparse.Namespace) -> dict:
    """One SPN cycle; returns (and writes to {out}/results.json) the metrics before and after stage 2."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = load(args.model)  # wrap.py: the whole integration
    if args.data:
        root = Path(args.data)
        captioner = None
    else:
        size = TINY_WORLD if args.world_size == "tiny" else args.world_size
        root = make_world(args.world, seed=args.seed, size=size)
        captioner = SyntheticCaptioner(root)
    transform = model.image_transform()  # timm's eval transform for the backbone
    train = cp.load_cirr(root, "train", transform=transform)
    val = cp.load_cirr(root, "val", transform=transform)

    # 1. the protocol dry run
    probe = list(train.triplets[:2])
    report = cp.check_model(model, train.images.batch([t.reference for t in probe]), [t.text for t in probe],
                            train.images.batch([t.target for t in probe]))
    logger.info("%s", report)
    report.raise_if_failed()

    # 2. more positives: generated triplets from every train image
    triplets = list(train.triplets)
    if captioner is not None:
        augmenter = cp.TripletAugmenter(captioner, model.embed_image, templates="cirr", rank_window=(0.25, 0.75),
                                        partners_per_image=1, seed=args.seed, show_progress=args.progress)
        generated = augmenter.augment(list(train.gallery_ids), train.images)
        triplets += [t for t in generated if t.source == "generated"]  # "plus": appended to the annotated
    logger.info("training triplets: %d annotated + %d generated", len(train.triplets),
                len(triplets) - len(train.triplets))

    # 3. more negatives: a static bank of every train image, one D-vector each
    bank = cp.NegativeBank.build(model, list(train.gallery_ids), train.images, batch_size=args.batch_size,
                                 show_progress=args.progress)
    bank.save(out / "bank.safetensors")
    logger.info("bank %s", tuple(bank.embeddings.shape))

    # 4. stage 2 (text encoder + composition trained; tau 0.02 fixed as for CLIP4Cir)
    def evaluate(m):
        return cp.evaluate(m, val, batch_size=args.batch_size, show_progress=args.progress)

    before = evaluate(model)
    config = cp.Stage2Config(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, temperature=0.02,
                             learn_temperature=False, steps_per_epoch=args.steps_per_epoch, seed=args.seed,
                             output_dir=str(out), show_progress=args.progress)
    trainer = cp.Stage2Trainer(model, bank, triplets, train.images, config=config, evaluate=evaluate)
    history = trainer.fit()
    after = evaluate(model)
    results = {"model": str(args.model), "data": str(root), "bank_shape": list(bank.embeddings.shape),
               "triplets": {"annotated": len(train.triplets), "total": len(triplets)},
               "before": _recalls(before), "after": _recalls(after),
               "history": [{k: v for k, v in h.items() if k != "metrics"} for h in history]}
    _atomic_json(out / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.timm_tirg.run", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny-checkpoint", help="write a tiny random TimmTIRG checkpoint (CPU demos)")
    tiny.add_argument("path")
    init = sub.add_parser("init", help="a fresh checkpoint from a timm model and a transformers text encoder")
    init.add_argument("path")
    init.add_argument("--image-model", required=True, help="timm model name, e.g. resnet50")
    init.add_argument("--text-model", required=True, help="transformers name or path, e.g. bert-base-uncased")
    init.add_argument("--pretrained", action="store_true", help="load timm's pretrained image weights")
    init.add_argument("--embed-dim", type=int, default=512)
    run = sub.add_parser("cycle", help="augment -> bank -> stage 2 -> evaluate")
    run.add_argument("--model", required=True, help="TimmTIRG checkpoint directory")
    run.add_argument("--world", default="runs/world", help="synthetic world root (created if missing)")
    run.add_argument("--world-size", default="tiny", choices=("tiny", "quick", "default"))
    run.add_argument("--data", default=None, help="a real CIRR root instead of the synthetic world")
    run.add_argument("--out", required=True, help="run directory (bank, checkpoints, results.json)")
    run.add_argument("--epochs", type=int, default=3)
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--lr", type=float, default=2e-5)
    run.add_argument("--steps-per-epoch", type=int, default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "tiny-checkpoint":
        path = make_tiny_checkpoint(args.path, WORLD_WORDS)
        print(f"tiny TimmTIRG checkpoint written to {path}")
        return 0
    if args.command == "init":
        model = TimmTIRG.build(args.image_model, args.text_model, pretrained=args.pretrained, embed_dim=args.embed_dim)
        print(f"TimmTIRG checkpoint written to {model.save_pretrained(args.path)}")
        return 0
    start = time.perf_counter()
    results = cycle(args)
    print(f"{'metric':<8}{'before':>9}{'after':>9}")
    for key in results["before"]:
        print(f"{key:<8}{results['before'][key]:>9.2f}{results['after'].get(key, float('nan')):>9.2f}")
    print(f"bank {tuple(results['bank_shape'])}, {results['triplets']['total']} triplets, "
          f"{time.perf_counter() - start:.1f} s; results in {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
