"""SPN on a CLIP4Cir stage-1 checkpoint: generated triplets (more positives), then stage 2 against a static
bank of every training image (more negatives), with the method's CLIP4Cir hyper-parameters.

    python examples/clip4cir/run_spn.py --dataset cirr --root DATA/cirr --stage1 runs/clip4cir-cirr/stage1 \
        --captioner hf:llava-hf/llava-1.5-7b-hf --out runs/clip4cir-cirr/spn

Defaults (METHOD.md section 3, CLIP4Cir row): stage-2 batch 256, 3 epochs, lr 2e-5, tau 0.02 fixed, the text
tower trained (+ the Combiner when the checkpoint uses it); the reference row masked; best epoch by
validation Rmean. Generation: every training image captioned, paired by a rank window of the pair encoder's
ranking (CIRR [10000, 15000), FashionIQ [10000, 20000) within a category, the synthetic world 2%-20% of N),
templates "cirr" (CIRR, synthetic) or "fashioniq"; generated triplets appended to the annotated ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import cir_plugins as cp  # noqa: E402
from wrap import wrap  # noqa: E402

WINDOWS = {"cirr": "10000,15000", "fashioniq": "10000,20000", "synthetic": "0.02,0.2"}
TEMPLATES = {"cirr": "cirr", "fashioniq": "fashioniq", "synthetic": "cirr"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_arguments(parser)
    parser.add_argument("--stage1", required=True, help="stage-1 checkpoint directory (train_stage1.py --out)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--captioner", default=None,
                        help="'synthetic' (the world's scene captions), 'file:PATH' (JSON {id: caption} or JSONL) or "
                             "'hf:MODEL' (a transformers image-to-text model); omit with --no-augment")
    parser.add_argument("--caption-noise", type=float, default=0.15, help="SyntheticCaptioner noise")
    parser.add_argument("--rank-window", default=None, help="'a,b' ranks (ints) or fractions of N; default per dataset")
    parser.add_argument("--no-augment", action="store_true", help="stage 2 on the annotated triplets only (+N)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument("--annotated-fraction", type=float, default=None,
                        help="share of annotated triplets per epoch (default: the natural mix, as the release)")
    parser.add_argument("--keep-reference", action="store_true", help="do not mask the reference row (the release)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="cap micro-batches per epoch (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_captioner(spec: str, root: str, noise: float, seed: int, device: str):
    if spec == "synthetic":
        return cp.SyntheticCaptioner(root, noise=noise, seed=seed)
    if spec.startswith("file:"):
        from cir_plugins.positives.captioners import PrecomputedCaptioner

        return PrecomputedCaptioner(spec[len("file:"):])
    if spec.startswith("hf:"):
        from cir_plugins.positives.captioners import HFCaptioner

        return HFCaptioner(spec[len("hf:"):], device=device)
    raise SystemExit(f"--captioner must be 'synthetic', 'file:PATH' or 'hf:MODEL'; got {spec!r}")


def parse_window(text: str):
    low, high = (v.strip() for v in text.split(","))
    as_int = all(v.lstrip("-").isdigit() for v in (low, high))
    return (int(low), int(high)) if as_int else (float(low), float(high))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging(args.verbose)
    show = not args.no_progress
    start = time.perf_counter()
    model = C.load_checkpoint(args.stage1, device=args.device)
    transform = C.targetpad(model)
    train_splits = C.load_splits(args.dataset, args.root, "train", transform, world_size=args.world_size)
    val_splits = C.load_splits(args.dataset, args.root, C.VAL_SPLIT[args.dataset], transform,
                               world_size=args.world_size)
    triplets, images = C.train_triplets(train_splits)
    image_ids = list(images)

    if not args.no_augment:
        if not args.captioner:
            raise SystemExit("--captioner is required unless --no-augment")
        started = time.perf_counter()
        augmenter = cp.TripletAugmenter(
            make_captioner(args.captioner, args.root, args.caption_noise, args.seed, args.device),
            model.encode_image, templates=TEMPLATES[args.dataset],
            rank_window=parse_window(args.rank_window or WINDOWS[args.dataset]), partners_per_image=1,
            seed=args.seed, show_progress=show)
        # FashionIQ pairs within a category (ranks counted inside it), as the release does
        groups = ({i: s.category for s in train_splits for i in s.gallery_ids} if args.dataset == "fashioniq"
                  else None)
        generated = [t for t in augmenter.augment(image_ids, images, groups=groups) if t.source == "generated"]
        print(f"augment: {len(generated)} generated triplets from {len(image_ids)} images "
              f"({time.perf_counter() - started:.1f}s); e.g. {generated[0].texts[0]!r}" if generated else "")
        triplets = triplets + generated

    wrapped = wrap(model)
    started = time.perf_counter()
    bank = cp.NegativeBank.build(wrapped, image_ids, images, batch_size=args.batch_size_eval, show_progress=show)
    print(f"bank: {bank!r} ({time.perf_counter() - started:.1f}s)")
    config = cp.Stage2Config(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             temperature=args.temperature, annotated_fraction=args.annotated_fraction,
                             mask_reference=not args.keep_reference, steps_per_epoch=args.steps_per_epoch,
                             seed=args.seed, select_metric="Rmean", output_dir=str(Path(args.out) / "train"),
                             show_progress=show)
    trainer = cp.Stage2Trainer(wrapped, bank, triplets, images, config=config, evaluate=lambda m: C.evaluate(
        m, val_splits, batch_size=args.batch_size_eval, show_progress=False))
    history = trainer.fit()
    trainer.load_weights("best")
    for entry in history:
        print(f"stage 2 epoch {entry['epoch']}: loss {entry['loss']:.4f}  {C.headline(entry['metrics'])}")
    C.save_checkpoint(model, args.out)
    C.write_json(Path(args.out) / "stage2_history.json", history)
    print(f"checkpoint: {args.out}  ({time.perf_counter() - start:.1f}s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
