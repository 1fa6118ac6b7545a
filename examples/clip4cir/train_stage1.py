"""Stage 1 of CLIP4Cir, as CLIP4Cir trains itself: (1) fine-tune both CLIP towers with the element-wise
sum fusion and in-batch negatives, then (2) freeze CLIP and train the Combiner.

    python examples/clip4cir/train_stage1.py --dataset cirr --root DATA/cirr \
        --clip openai/clip-vit-base-patch32 --out runs/clip4cir-cirr/stage1

Defaults follow CLIP4Cir's published commands: CLIP fine-tuning lr 2e-6, batch 128, logits x100
(tau 0.01), targetpad 1.25; Combiner lr 2e-5, batch 4096, p = 4d, h = 8d. ``--fusion sum`` stops after
phase 1 (the variant the SPN release fine-tunes in stage 2). The best epoch by validation Rmean is kept.
Writes a checkpoint directory loadable by path (CLIP safetensors + tokenizer + processor + Combiner).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

import cir_plugins as cp  # noqa: E402

CLIP_TOWERS = ["clip.text_model", "clip.text_projection", "clip.vision_model", "clip.visual_projection"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_arguments(parser)
    parser.add_argument("--clip", required=True, help="CLIP hub name or local checkpoint directory")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--fusion", choices=("combiner", "sum"), default="combiner")
    parser.add_argument("--clip-epochs", type=int, default=100)
    parser.add_argument("--clip-lr", type=float, default=2e-6)
    parser.add_argument("--clip-batch", type=int, default=128)
    parser.add_argument("--combiner-epochs", type=int, default=300)
    parser.add_argument("--combiner-lr", type=float, default=2e-5)
    parser.add_argument("--combiner-batch", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=0.01, help="in-batch tau (CLIP4Cir scales logits by 100)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="cap micro-batches per epoch (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging(args.verbose)
    show = not args.no_progress
    start = time.perf_counter()
    model = C.load_checkpoint(args.clip, fusion="sum", device=args.device)
    transform = C.targetpad(model)
    train_splits = C.load_splits(args.dataset, args.root, "train", transform, world_size=args.world_size)
    eval_splits = C.load_splits(args.dataset, args.root, C.VAL_SPLIT[args.dataset], transform,
                                world_size=args.world_size)
    triplets, images = C.train_triplets(train_splits)
    print(f"stage 1 on {len(triplets)} triplets; validating on {[repr(s) for s in eval_splits]}")

    def validate(m):
        return C.evaluate(m, eval_splits, batch_size=args.batch_size_eval, show_progress=False)

    out = Path(args.out)
    phases = [("clip", "sum", CLIP_TOWERS, args.clip_epochs, args.clip_lr, args.clip_batch)]
    if args.fusion == "combiner":
        phases.append(("combiner", "combiner", ["combiner"], args.combiner_epochs, args.combiner_lr,
                       args.combiner_batch))
    for name, fusion, trainable, epochs, lr, batch in phases:
        started = time.perf_counter()
        model.fusion = fusion
        config = cp.Stage1Config(epochs=epochs, lr=lr, batch_size=batch, temperature=args.temperature,
                                 steps_per_epoch=args.steps_per_epoch, seed=args.seed,
                                 output_dir=str(out / f"train-{name}"), show_progress=show)
        trainer = cp.Stage1Trainer(model, triplets, images, config=config,
                                   evaluator=cp.Evaluator(validate, metric="Rmean"), trainable=trainable)
        history = trainer.fit()  # ends on the best epoch's weights (by validation Rmean)
        best = max(history, key=lambda h: h["metrics"].get("Rmean", float("-inf")))
        print(f"phase {name}: best epoch {best['epoch']}: {C.headline(best['metrics'])} "
              f"({time.perf_counter() - started:.1f}s)")
    model.fusion = args.fusion
    C.save_checkpoint(model, out)
    result = validate(model.eval())
    C.write_json(out / "stage1_metrics.json", result)
    print(f"stage 1 ({args.fusion}) on {C.VAL_SPLIT[args.dataset]}: "
          f"{C.headline(result)}")
    print(f"checkpoint: {out}  ({time.perf_counter() - start:.1f}s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
