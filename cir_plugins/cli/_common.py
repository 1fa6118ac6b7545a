"""Flags and helpers shared by the command modules, each declared once.

- :func:`add_model_arguments`: ``--model`` (a factory spec), ``--factory-kwargs``, ``--device``.
- :func:`add_dataset_arguments`: ``--dataset``, ``--root``, ``--split``, ``--category``, ``--transform``,
  ``--image-size``, ``--on-bad-record``; :func:`load_dataset` reads the split they name.
- :func:`add_groups_arguments` / :func:`read_groups`: duplicate groups (``--groups`` / ``--dedup``).
- :func:`add_progress_argument`: ``--no-progress``.
- :func:`read_triplets`: the triplet files that ``--generated`` names.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..data.triplet import Triplet
from ..errors import ConfigError, DataError, explain

logger = logging.getLogger(__name__)

DATASETS = ("cirr", "fashioniq", "synthetic")
CATEGORIES = ("dress", "shirt", "toptee")
TRANSFORMS = ("clip", "targetpad", "squarepad", "none")
FACTORY_FIX = 'pass a JSON object, e.g. \'{"dim": 64}\''


# --- model -------------------------------------------------------------------------------------------

def add_factory_arguments(parser: argparse.ArgumentParser, *, flag: str = "--model",
                          help: str = "factory spec 'file.py:function' or 'pkg.module:function' returning the model") -> None:
    """``flag`` (a factory spec) and ``--factory-kwargs`` (its JSON keyword arguments)."""
    parser.add_argument(flag, required=True, help=help)
    parser.add_argument("--factory-kwargs", default="{}", help="JSON object of keyword arguments for the factory")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (default: where the factory put it)."""
    parser.add_argument("--device", default=None,
                        help="e.g. cpu or cuda:0: where the model (for augment: the pair encoder and an hf: "
                             "captioner) runs (default: where the factory put it; cpu for an hf: captioner)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--factory-kwargs`` and ``--device``."""
    add_factory_arguments(parser)
    add_device_argument(parser)


def parse_json_object(text: str, option: str, fix: str) -> dict:
    """``text`` (the value of ``option``) parsed as a JSON object; ConfigError naming ``option`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(explain(f"{option} is not valid JSON", got=text, fix=fix)) from error
    if not isinstance(value, dict):
        raise ConfigError(explain(f"{option} must be a JSON object", got=text))
    return value


def model_from_factory(args: argparse.Namespace, spec: str | None = None) -> Any:
    """``load_factory(spec or args.model)(**json(args.factory_kwargs))``: the factory's model, unwrapped."""
    from .._loading import load_factory

    kwargs = parse_json_object(args.factory_kwargs, "--factory-kwargs", FACTORY_FIX)
    return load_factory(spec if spec is not None else args.model)(**kwargs)


def build_model(args: argparse.Namespace) -> Any:
    """The factory's model, wrapped to the protocol, on ``--device``."""
    from ..protocol import wrap_model

    model = wrap_model(model_from_factory(args))
    if args.device is not None:
        model = model.to(args.device)
    return model


def model_device(model: Any) -> Any:
    """The device of the model's first parameter (cpu for a model without parameters)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else "cpu"


# --- data ---------------------------------------------------------------------------------------------

def add_dataset_arguments(parser: argparse.ArgumentParser, *, default_split: str = "train",
                          many_categories: bool = False, default_dataset: str | None = None) -> None:
    """The dataset flags. ``many_categories``: ``--category`` is repeatable and accepts ``all``;
    ``default_dataset``: ``--dataset`` may be left out."""
    parser.add_argument("--dataset", required=default_dataset is None, default=default_dataset, choices=DATASETS,
                        help=None if default_dataset is None else f"(default: {default_dataset})")
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--split", default=default_split, help=f"split name on disk (default: {default_split})")
    if many_categories:
        parser.add_argument("--category", action="append", default=None,
                            help="FashionIQ category (repeatable) or 'all' (default: all)")
    else:
        parser.add_argument("--category", default=None, choices=CATEGORIES,
                            help="FashionIQ category (required for fashioniq)")
    parser.add_argument("--transform", default="clip", choices=TRANSFORMS,
                        help="image preprocessing ('none': no resize, [0, 1] floats) (default: clip)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--on-bad-record", default="error", choices=("error", "skip"),
                        help="a malformed annotation record stops the run (error, default) or is logged, counted "
                             "and skipped (skip)")


def load_dataset(args: argparse.Namespace, split: str | None = None, category: str | None = None) -> Any:
    """The :class:`~cir_plugins.data.split.Split` the dataset flags name (``split`` overrides ``--split``)."""
    from ..data.fashioniq import load_split

    if category is None and isinstance(getattr(args, "category", None), str):
        category = args.category
    return load_split(args.root, args.dataset, split or args.split, category, transform=args.transform,
                      size=args.image_size, on_bad_record=args.on_bad_record)


def add_groups_arguments(parser: argparse.ArgumentParser) -> None:
    """``--groups`` (a JSON file), ``--dedup`` (the default) and ``--no-dedup``."""
    parser.add_argument("--groups", default=None, help="JSON object image id -> duplicate-group id")
    parser.add_argument("--dedup", action="store_true",
                        help="group pixel-identical images (the default unless --groups is given; overrides --groups)")
    parser.add_argument("--no-dedup", action="store_true",
                        help="one row per image id: pixel-identical copies stay separate rows (negatives of each other)")


def read_groups(args: argparse.Namespace, split: Any, show_progress: bool) -> dict[str, str] | None:
    """Duplicate groups: found (pixel-identical images) by default and with ``--dedup``, read from
    ``--groups``, None (one row per id) with ``--no-dedup``."""
    if args.dedup and args.no_dedup:
        raise ConfigError(explain("--dedup and --no-dedup contradict each other", fix="pass one of them"))
    if args.dedup or (args.groups is None and not args.no_dedup):
        from ..positives.dedup import find_duplicates

        return find_duplicates(list(split.gallery_ids), split.images, show_progress=show_progress)
    if args.groups is None:
        return None
    path = Path(args.groups)
    try:
        groups = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(explain("cannot read the groups file", got=f"{path}: {error}",
                                expected="a JSON object image id -> group id")) from error
    if not isinstance(groups, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in groups.items()):
        raise DataError(explain("the groups file must be a JSON object of strings", got=type(groups).__name__))
    return groups


def read_triplets(path: str | Path) -> list[Triplet]:
    """Triplets from a JSON file: what ``cir-plugins augment`` writes (the CIRR or FashionIQ annotation
    schema, recognised by their keys), or a plain list (or ``{"triplets": [...]}``) of objects with
    ``reference``, ``texts`` (or ``text``), ``target`` and optionally ``source`` / ``meta``.
    A bad record raises DataError naming its index."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(explain("cannot read the triplets file", got=f"{path}: {error}")) from error
    records = data.get("triplets") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DataError(explain("the triplets file must hold a list of records", got=type(records).__name__))
    first = records[0] if records and isinstance(records[0], dict) else {}
    if "target_hard" in first:  # the CIRR schema, as `cir-plugins augment --dataset cirr|synthetic` writes
        from ..positives.annotations import read_generated_cirr
        return read_generated_cirr(path)
    if "candidate" in first:  # the FashionIQ schema
        from ..positives.annotations import read_generated_fashioniq
        return read_generated_fashioniq(path)
    out = []
    for index, record in enumerate(records):
        try:
            texts = record.get("texts", record.get("text"))
            out.append(Triplet(record["reference"], texts, record["target"], source=record.get("source", "generated"),
                               meta=record.get("meta", {})))
        except (KeyError, TypeError, AttributeError, DataError) as error:
            raise DataError(explain(f"bad triplet record #{index} in {path}", got=str(error),
                                    expected="an object with reference, texts and target")) from error
    return out


# --- console ------------------------------------------------------------------------------------------

def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
