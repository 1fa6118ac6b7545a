"""``cir-plugins recipe``: the paper's settings per base model and dataset, and one command per table row.

    cir-plugins recipe list
    cir-plugins recipe show clip4cir-cirr
    cir-plugins recipe run clip4cir-cirr --model my_clip4cir.py:build --trained runs/stage1 --root DATA/cirr \\
        --captioner hf:llava-hf/llava-1.5-7b-hf --out runs/clip4cir-cirr

``run`` goes through every step (:func:`cir_plugins.recipes.run.reproduce`): generate (or ``--generated FILE``,
an ``augment`` output or the release's ``cap.*extend*`` file), build the bank, stage 2 with the recipe's
settings, evaluate with its protocol, then print the measured table beside the published one and write
``{out}/results.json``. ``--release``, ``--precision release`` and ``--rank-window fractions`` choose the
release's side of a difference (``--help``); ``--resume`` continues a stopped run in ``--out``.

``recipe list`` prints under each recipe the commands that reproduce it on the full data set (the conversion of
the release's checkpoint where one is needed, then ``recipe run``); words in capitals and the ``runs/`` folders
are yours to fill (``DATA/<dataset>``: the dataset root, ``YOUR_<MODEL>.py``: your model factory).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._loading import IMAGE_ENCODER_PREFIXES, load_image_encoder
from ..data.images import TRANSFORM_NAMES
from ..errors import ConfigError, explain
from ..recipes import CAPTIONER
from ._common import add_model_arguments, add_progress_argument, build_model, model_from_factory, show_progress
from .augment import add_captioner_arguments, build_captioner

__all__ = ["configure", "run", "command_of", "commands_of", "CAPTIONER"]


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="the recipes: base model x dataset, with the published numbers")
    show = sub.add_parser("show", help="one recipe's settings (JSON), or --markdown: what it runs and why")
    show.add_argument("name", help="a recipe name (recipe list) or a recipe JSON file")
    show.add_argument("--markdown", action="store_true",
                      help="the recipe for a reader: its checkpoint and conversion, the command, what trains, the "
                           "annotated share and the pool with their derivations, the release's values "
                           "(docs/recipes.md)")
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
                    help="the image encoder that ranks partners: open_clip:MODEL[:PRETRAINED] (e.g. "
                         "open_clip:ViT-L-14:openai), hf:NAME_OR_PATH (a transformers vision model), or a factory spec "
                         "file.py:function; default: the model's own encode_image (the release used Unicom ViT-L/14, "
                         "not on PyPI)")
    go.add_argument("--precision", default="ours", choices=("ours", "release"),
                    help="ours: bf16 autocast and a bf16 bank on CUDA (float32 on CPU); release: fp16 autocast with "
                         "a GradScaler and a float32 bank, as the release trains (CUDA only)")
    go.add_argument("--text-length", default="target", choices=("target", "truncate"),
                    help="a generated text longer than the model's tokenizer takes: replaced by the target caption "
                         "alone (target, the release's rule) or cut to the limit (truncate)")
    go.add_argument("--resume", action="store_true",
                    help="continue the stopped run in --out (generation, bank shards and checkpoints reused); "
                         "refused when --out holds a run of another recipe or other settings")
    go.add_argument("--transform", default="targetpad", choices=TRANSFORM_NAMES,
                    help="image preprocessing (default: targetpad, as the release's models)")
    go.add_argument("--image-size", type=int, default=224)
    go.add_argument("--rank-window", default=None,
                    help="override the recipe's window: 'a,b' (ints: ranks, floats: fractions of N), '-1' (any), "
                         "or 'fractions' (the recipe's window as a share of the release's pool, the images its "
                         "annotated triplets name)")
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


def command_of(recipe: Any) -> str:
    """The ``recipe run`` line that reproduces ``recipe`` on the full data set (README: "Reproduce the paper")."""
    return recipe.commands()[-1]


def commands_of(recipe: Any) -> list[str]:
    """What ``recipe list`` prints under ``recipe`` (:meth:`cir_plugins.recipes.Recipe.commands`)."""
    return recipe.commands()


def _list() -> int:
    from ..recipes import list_recipes, load_recipe

    print(f"{'recipe':<20}{'model':<40}{'published (after)'}")
    for name in list_recipes():
        recipe = load_recipe(name)
        after = (recipe.published or {}).get("after", {})
        shown = ", ".join(f"{k} {v:.2f}" for k, v in after.items() if k in ("Rmean", "Avg R@10", "Avg R@50")) or "-"
        print(f"{name:<20}{recipe.model_label:<40}{shown}")
        for command in commands_of(recipe):
            print(f"    {command}")
    return 0


def _captioner(args: argparse.Namespace, recipe: Any, categories: dict | None) -> Any:
    """The captioner of ``--captioner`` with the recipe's prompt and word budget (FashionIQ: each image's category)."""
    spec = argparse.Namespace(**{**vars(args), "dataset": recipe.dataset, "category": None, "categories": categories,
                                 "words": recipe.generation.words, "prompt": recipe.generation.prompt})
    return build_captioner(args.captioner, spec)


def _window(args: argparse.Namespace, recipe: Any) -> Any:
    if args.rank_window != "fractions":
        return args.rank_window  # None: the recipe's own
    fractions = recipe.generation.window_fractions(recipe.dataset)
    return fractions if fractions is not None else (-1, -1)


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
        categories = None if recipe.dataset != "fashioniq" else load_training_data(  # the prompt names each category
            "fashioniq", args.root, transform=transform, size=args.image_size).categories
        captioner = _captioner(args, recipe, categories)
    pair_encoder = None
    if args.pair_encoder and args.pair_encoder.startswith(IMAGE_ENCODER_PREFIXES):
        pair_encoder = load_image_encoder(args.pair_encoder, device=args.device,
                                          trust_remote_code=args.trust_remote_code)
    elif args.pair_encoder:
        pair_encoder = model_from_factory(args, spec=args.pair_encoder)
    stage2 = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                ("steps_per_epoch", args.steps_per_epoch)) if v is not None}
    stage1 = {"epochs": args.stage1_epochs} if args.stage1_epochs is not None else {}
    if stage1 and recipe.stage1_training is None:
        raise ConfigError(explain("--stage1-epochs is for the zero-shot recipes (they train stage 1)",
                                  got=recipe.name, fix="drop --stage1-epochs"))
    if "steps_per_epoch" in stage2 and recipe.stage1_training is not None:
        stage1.setdefault("steps_per_epoch", stage2["steps_per_epoch"])
    # what identifies the run besides the recipe and the reproduce() arguments (a resumed run must match)
    settings = {"model": args.model, "factory_kwargs": args.factory_kwargs, "trained": args.trained,
                "pair_encoder": args.pair_encoder or "model", "captioner": args.captioner, "release": args.release}
    result = reproduce(recipe, model, args.root, output_dir=args.out, captioner=captioner, generated=args.generated,
                       pair_encoder=pair_encoder, transform=transform, image_size=args.image_size,
                       rank_window=_window(args, recipe), stage2_overrides=stage2, stage1_overrides=stage1,
                       evaluate_before=not args.no_before, seed=args.seed, eval_batch_size=args.eval_batch_size,
                       text_length=args.text_length, precision=args.precision, resume=args.resume,
                       settings=settings, show_progress=show_progress(args))
    print(result.table())
    return 0


def run(args: argparse.Namespace) -> int:
    if args.recipe_command == "list":
        return _list()
    if args.recipe_command == "show":
        from ..recipes import load_recipe

        recipe = load_recipe(args.name)
        print(recipe.describe() if args.markdown else json.dumps(recipe.to_dict(), indent=2))
        return 0
    return _run(args)
