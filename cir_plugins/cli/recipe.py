"""``cir-plugins recipe``: the paper's settings per base model and dataset, and one command per table row.

    cir-plugins recipe list
    cir-plugins recipe show clip4cir-cirr
    cir-plugins recipe run clip4cir-cirr --model my_clip4cir.py:build --trained runs/stage1 --root DATA/cirr \\
        --captioner hf:llava-hf/llava-1.5-7b-hf --out runs/clip4cir-cirr

``run`` goes through every step with the library's own pieces (:func:`cir_plugins.recipes.run.reproduce`):
generate (or ``--generated FILE``: an ``augment`` output or the release's own ``cap.*extend*`` file, which
skips captioning), build the bank, stage 2 with the recipe's settings (best epoch by validation Rmean;
FashionIQ: the three categories together, selected on their average), evaluate with the recipe's
protocol; then prints the measured table beside the published one and writes ``{out}/results.json``.
``--release`` uses the release's value of each deliberate difference (reference row kept as a negative,
bank over the images the triplets name). The rank window is the recipe's absolute one (the release's,
right for the full data sets); ``--rank-window fractions`` scales it to the data set's size.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..data.images import TRANSFORM_NAMES
from ..errors import ConfigError, explain
from ._common import add_model_arguments, add_progress_argument, build_model, model_from_factory, show_progress
from .augment import add_captioner_arguments, build_captioner

__all__ = ["configure", "run", "command_of"]


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="the recipes: base model x dataset, with the published numbers")
    show = sub.add_parser("show", help="one recipe's settings (JSON)")
    show.add_argument("name", help="a recipe name (recipe list) or a recipe JSON file")
    go = sub.add_parser("run", help="generate, bank, stage 2, evaluate; print measured beside published")
    go.add_argument("name", help="a recipe name (recipe list) or a recipe JSON file")
    add_model_arguments(go)  # --model (the base model's factory), --factory-kwargs, --trained (its stage 1), --device
    go.add_argument("--root", required=True, help="dataset root (CIRR rc2 or FashionIQ layout)")
    go.add_argument("--out", required=True, help="run folder: generated triplets, checkpoints, results.json")
    source = go.add_mutually_exclusive_group(required=True)
    source.add_argument("--captioner", help="hf:<name-or-path> | file:<captions.json|jsonl> (the recipe's prompt "
                                           "and word budget are used for hf:)")
    source.add_argument("--generated", help="a generated-triplet file instead of captioning (either schema)")
    go.add_argument("--pair-encoder", default=None,
                    help="factory spec of the image encoder that ranks partners (default: the model's encode_image)")
    go.add_argument("--transform", default="targetpad", choices=TRANSFORM_NAMES,
                    help="image preprocessing (default: targetpad, as the release's models)")
    go.add_argument("--image-size", type=int, default=224)
    go.add_argument("--rank-window", default=None,
                    help="override the recipe's window: 'a,b' (ints: ranks, floats: fractions of N), '-1' (any), "
                         "or 'fractions' (the recipe's window as a share of the release's training set)")
    go.add_argument("--release", action="store_true",
                    help="the release's values of our deliberate differences (reference row kept as a negative, "
                         "bank over the images the triplets name)")
    go.add_argument("--seed", type=int, default=0)
    go.add_argument("--epochs", type=int, default=None, help="override the recipe's stage-2 epochs")
    go.add_argument("--batch-size", type=int, default=None, help="override the recipe's stage-2 batch")
    go.add_argument("--steps-per-epoch", type=int, default=None, help="cap stage-2 micro-batches per epoch")
    go.add_argument("--stage1-epochs", type=int, default=None, help="zero-shot rows: override stage-1 epochs")
    go.add_argument("--eval-batch-size", type=int, default=64, help="images per encoder call (bank, evaluation)")
    go.add_argument("--no-before", action="store_true", help="skip evaluating the starting model")
    add_captioner_arguments(go)  # --caption-batch-size, --max-new-tokens, --dtype, --trust-remote-code, --skip-empty
    add_progress_argument(go)


# the model factory each recipe's command names: this repository's examples where there is one
_FACTORIES = {
    "clip4cir": "examples/clip4cir/_common.py:factory --factory-kwargs '{\"checkpoint\": \"runs/clip4cir-rn50x4\"}' "
                "--image-size 288",
    "sprc": "examples.blip2_sprc.wrap:load --factory-kwargs '{\"path\": \"runs/sprc_stage1\"}'",
    "tgcir": "YOUR_TGCIR.py:build --trained runs/tgcir-stage1",
    "blip4cir": "YOUR_BLIP4CIR.py:build --trained runs/blip4cir-stage1",
    "zeroshot": "examples/clip4cir/_common.py:factory --factory-kwargs "
                "'{\"checkpoint\": \"openai/clip-vit-large-patch14\", \"fusion\": \"sum\"}'",
}


def command_of(recipe: Any) -> str:
    """The command line that runs ``recipe`` on the full data set (README: "Reproduce the paper")."""
    return (f"cir-plugins recipe run {recipe.name} --model {_FACTORIES[recipe.model]} --root DATA/{recipe.dataset} "
            f"--captioner hf:llava-hf/llava-1.5-7b-hf --out runs/{recipe.name}")


def _list() -> int:
    from ..recipes import list_recipes, load_recipe

    print(f"{'recipe':<20}{'model':<40}{'published (after)'}")
    for name in list_recipes():
        recipe = load_recipe(name)
        after = (recipe.published or {}).get("after", {})
        shown = ", ".join(f"{k} {v:.2f}" for k, v in after.items() if k in ("Rmean", "Avg R@10", "Avg R@50")) or "-"
        print(f"{name:<20}{recipe.model_label:<40}{shown}")
        print(f"    {command_of(recipe)}")
    return 0


def _captioner(args: argparse.Namespace, recipe: Any, categories: dict | None) -> Any:
    """The captioner of ``--captioner``, with the recipe's prompt and word budget (and, on FashionIQ, each
    image's own category in the prompt)."""
    spec = argparse.Namespace(**vars(args))
    spec.dataset, spec.category, spec.categories = recipe.dataset, None, categories
    spec.words, spec.prompt = recipe.generation.words, recipe.generation.prompt
    return build_captioner(args.captioner, spec)


def _window(args: argparse.Namespace, recipe: Any) -> Any:
    if args.rank_window is None:
        return None
    if args.rank_window == "fractions":
        fractions = recipe.generation.window_fractions(recipe.dataset)
        return fractions if fractions is not None else (-1, -1)
    return args.rank_window


def _run(args: argparse.Namespace) -> int:
    from ..recipes import load_recipe
    from ..recipes.run import load_training_data, reproduce

    recipe = load_recipe(args.name)
    if args.release:
        recipe = recipe.as_release()
    model = build_model(args)  # the stage-1 model: the factory's, with each --trained result on it
    transform = None if args.transform == "none" else args.transform
    captioner = None
    if args.captioner is not None:
        categories = None
        if recipe.dataset == "fashioniq":  # the prompt names each image's own category
            categories = load_training_data("fashioniq", args.root, transform=transform,
                                            size=args.image_size).categories
        captioner = _captioner(args, recipe, categories)
    pair_encoder = model_from_factory(args, spec=args.pair_encoder) if args.pair_encoder else None
    stage2 = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                ("steps_per_epoch", args.steps_per_epoch)) if v is not None}
    stage1 = {"epochs": args.stage1_epochs} if args.stage1_epochs is not None else {}
    if stage1 and recipe.stage1_training is None:
        raise ConfigError(explain("--stage1-epochs is for the zero-shot recipes (they train stage 1)",
                                  got=recipe.name, fix="drop --stage1-epochs"))
    if "steps_per_epoch" in stage2 and recipe.stage1_training is not None:
        stage1.setdefault("steps_per_epoch", stage2["steps_per_epoch"])
    result = reproduce(recipe, model, args.root, output_dir=args.out, captioner=captioner, generated=args.generated,
                       pair_encoder=pair_encoder, transform=transform, image_size=args.image_size,
                       rank_window=_window(args, recipe), stage2_overrides=stage2, stage1_overrides=stage1,
                       evaluate_before=not args.no_before, seed=args.seed, eval_batch_size=args.eval_batch_size,
                       show_progress=show_progress(args))
    print(result.table())
    return 0


def run(args: argparse.Namespace) -> int:
    if args.recipe_command == "list":
        return _list()
    if args.recipe_command == "show":
        from ..recipes import load_recipe

        print(json.dumps(load_recipe(args.name).to_dict(), indent=2))
        return 0
    return _run(args)
