"""SPN on a CLIP4Cir stage-1 checkpoint: generated triplets (more positives), then stage 2 against a static bank of
every training image (more negatives), with the paper's CLIP4Cir recipe run by the library's ``reproduce``.

    python examples/clip4cir/run_spn.py --dataset cirr --root DATA/cirr --stage1 runs/clip4cir-cirr/stage1 \
        --captioner hf:llava-hf/llava-1.5-7b-hf --out runs/clip4cir-cirr/spn

Settings: the recipe ``clip4cir-cirr`` / ``clip4cir-fashioniq`` (``cir-plugins recipe show clip4cir-cirr``):
- generation: CIRR every training image, partner window [10000, 15000), templates "{T} instead of {R}" /
  "Unlike {R}, I want {T}", captions "in 8 words"; FashionIQ only the annotated references ("refer"), partners
  ranked over the three categories' training images together with the window [10000, 20000), template "{T}",
  each image captioned "please briefly describe the {dress|shirt|toptee} in 4 words" with its own category;
- bank: every training image, one row per group of pixel-identical images;
- stage 2: batch 256, 3 epochs, lr 2e-5, tau 0.02 fixed, AdamW (0.9, 0.999), eps 1e-7, weight decay 0.01, the text
  tower trained (+ the Combiner when the checkpoint uses it), the reference row masked (``--keep-reference``: the
  release), best epoch by validation Rmean (FashionIQ: the three categories' average);
- evaluation: CIRR protocol; FashionIQ with the reference removed from the gallery, as the release evaluated its
  CLIP4Cir rows (the original CLIP4Cir code keeps it).
The synthetic world uses the CIRR recipe with the window as fractions (2%-20% of N). Any flag below overrides.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from wrap import wrap  # noqa: E402

from cir_plugins.data.synthetic import SyntheticCaptioner  # noqa: E402
from cir_plugins.recipes import Recipe, load_recipe  # noqa: E402
from cir_plugins.recipes.run import load_training_data, reproduce  # noqa: E402

# the synthetic world (a few thousand images) takes the CIRR recipe with its window as a share of N
SYNTHETIC_WINDOW = (0.02, 0.2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_arguments(parser)
    parser.add_argument("--stage1", required=True, help="stage-1 checkpoint directory (train_stage1.py --out)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", default=None,
                        help="a recipe name or JSON file (default: clip4cir-<dataset>; the synthetic world: CIRR's)")
    parser.add_argument("--captioner", default=None,
                        help="'synthetic' (the world's scene captions), 'file:PATH' (JSON {id: caption} or JSONL) or "
                             "'hf:MODEL' (a transformers image-to-text model, prompted as the recipe says)")
    parser.add_argument("--generated", default=None,
                        help="a generated-triplet file instead of captioning (an augment output, or the release's "
                             "cap.rc2.train.extend_clip.json / cap.extend_clip.train.json)")
    parser.add_argument("--caption-noise", type=float, default=0.15, help="SyntheticCaptioner noise")
    parser.add_argument("--rank-window", default=None,
                        help="'a,b' ranks (ints) or fractions of N (floats), '-1' any image, or 'fractions' (the "
                             "recipe's window as a share of the release's pool); default: the recipe's")
    parser.add_argument("--no-augment", action="store_true", help="stage 2 on the annotated triplets only (+N)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (3)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (256)")
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's (2e-5)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the recipe's (0.02)")
    parser.add_argument("--annotated-fraction", type=float, default=None,
                        help="share of annotated triplets per epoch (default: the natural mix, as the release)")
    parser.add_argument("--keep-reference", action="store_true", help="do not mask the reference row (the release)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="cap micro-batches per epoch (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def recipe_for(dataset: str, name: str | None = None) -> Recipe:
    """The recipe this script runs: ``name``, else CLIP4Cir's for the dataset (the synthetic world: CIRR's,
    with the window as a share of N)."""
    if name is not None:
        return load_recipe(name)
    if dataset != "synthetic":
        return load_recipe(f"clip4cir-{dataset}")
    return load_recipe("clip4cir-cirr").on_synthetic(SYNTHETIC_WINDOW)


def captioner_kwargs(recipe: Recipe, categories: dict[str, str] | None) -> dict:
    """HFCaptioner settings of the recipe: its prompt and word budget; on FashionIQ each image's own category."""
    fashion = "{category}" in recipe.generation.prompt
    return {"domain": "fashion" if fashion else "general", "prompt": recipe.generation.prompt,
            "k": recipe.generation.words, "category": categories if fashion else None}


def make_captioner(spec: str, root: str, recipe: Recipe, categories: dict[str, str] | None, *, noise: float,
                   seed: int, device: str):
    if spec == "synthetic":
        return SyntheticCaptioner(root, noise=noise, seed=seed)
    if spec.startswith("file:"):
        from cir_plugins.positives.captioners import PrecomputedCaptioner

        return PrecomputedCaptioner(spec[len("file:"):])
    if spec.startswith("hf:"):
        from cir_plugins.positives.captioners import HFCaptioner

        return HFCaptioner(spec[len("hf:"):], device=device, **captioner_kwargs(recipe, categories))
    raise SystemExit(f"--captioner must be 'synthetic', 'file:PATH' or 'hf:MODEL'; got {spec!r}")


def window_of(text: str | None, recipe: Recipe):
    """``--rank-window``: None (the recipe's), 'fractions', or 'a,b' (ints: ranks; floats: fractions of N)."""
    if text is None:
        return None
    if text == "fractions":
        return recipe.generation.window_fractions(recipe.dataset) or (-1, -1)
    return text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging(args.verbose)
    show = not args.no_progress
    start = time.perf_counter()
    if args.dataset == "synthetic":
        C.load_splits("synthetic", args.root, "train", None, world_size=args.world_size)  # creates a missing world
    recipe = recipe_for(args.dataset, args.recipe)
    model = C.load_checkpoint(args.stage1, device=args.device)
    transform = C.targetpad(model)
    captioner = None
    if not args.no_augment and args.generated is None:
        if not args.captioner:
            raise SystemExit("--captioner (or --generated) is required unless --no-augment")
        categories = (load_training_data("fashioniq", args.root, transform=transform).categories
                      if args.dataset == "fashioniq" else None)
        captioner = make_captioner(args.captioner, args.root, recipe, categories, noise=args.caption_noise,
                                   seed=args.seed, device=args.device)
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "temperature": args.temperature, "annotated_fraction": args.annotated_fraction,
                 "steps_per_epoch": args.steps_per_epoch}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.keep_reference:
        overrides["mask_reference"] = False
    result = reproduce(recipe, wrap(model), args.root, output_dir=Path(args.out) / "train", captioner=captioner,
                       generated=None if args.no_augment else args.generated, pair_encoder=model.encode_image,
                       transform=transform, rank_window=window_of(args.rank_window, recipe),
                       stage2_overrides=overrides, seed=args.seed, eval_batch_size=args.batch_size_eval,
                       show_progress=show)
    for entry in result.history:
        print(f"stage 2 epoch {entry['epoch']}: loss {entry['loss']:.4f}  {C.headline(entry['metrics'])}")
    print(result.table())
    C.save_checkpoint(model, args.out)
    C.write_json(Path(args.out) / "stage2_history.json", result.history)
    print(f"checkpoint: {args.out}  ({time.perf_counter() - start:.1f}s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
