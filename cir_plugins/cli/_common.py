"""Flags and helpers shared by the command modules, each declared once: the model (:func:`add_model_arguments`,
:func:`build_model`, each ``--trained`` result checked against what it was trained on and with), the dataset
(:func:`add_dataset_arguments`, :func:`load_dataset`), duplicate groups, ``--progress`` and the training flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from pathlib import Path
from typing import Any

from .._console import format_values
from ..data.fashioniq import CATEGORIES
from ..data.images import TRANSFORM_NAMES
from ..data.triplet import Triplet
from ..errors import CheckpointError, ConfigError, DataError, explain
from ..positives.annotations import read_generated

logger = logging.getLogger(__name__)

DATASETS = ("cirr", "fashioniq", "synthetic")  # the layouts load_split reads (synthetic: the CIRR layout)
FACTORY_FIX = 'pass a JSON object, e.g. \'{"dim": 64}\''
DEFAULT_TRANSFORM, DEFAULT_IMAGE_SIZE = "clip", 224  # when neither the flags nor a --trained result / --bank say
OVERRIDE_FLAG = "--allow-provenance-mismatch"


def add_factory_arguments(parser: argparse.ArgumentParser, *, flag: str = "--model",
                          help: str = "factory spec 'file.py:function' or 'pkg.module:function' returning "
                                      "the model") -> None:
    """``flag`` (a factory spec) and ``--factory-kwargs`` (its JSON keyword arguments)."""
    parser.add_argument(flag, required=True, help=help)
    parser.add_argument("--factory-kwargs", default="{}", help="JSON object of keyword arguments for the factory")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (default: where the factory put it)."""
    parser.add_argument("--device", default=None,
                        help="e.g. cpu or cuda:0: where the model (for augment: the pair encoder and an hf: "
                             "captioner) runs (default: where the factory put it; cpu for an hf: captioner)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--factory-kwargs``, ``--trained`` and ``--device``."""
    add_factory_arguments(parser)
    parser.add_argument("--trained", action="append", default=None, metavar="PATH",
                        help="a trained result to put onto the factory's model (cp.load_trained): a stage1/stage2 "
                             "--out folder (its best checkpoint, else its last), a checkpoint folder or a weights "
                             ".safetensors; repeat to apply several in order, e.g. --trained runs/stage1 "
                             "--trained runs/stage2")
    add_device_argument(parser)
    parser.add_argument(OVERRIDE_FLAG, action="store_true",
                        help="go on (with a warning) when a --trained result is loaded on another base or in another "
                             "order than it was trained on, or the images are preprocessed otherwise than the "
                             "--trained results and --bank recorded (default: an error naming both sides)")


def parse_json_object(text: str, option: str, fix: str) -> dict:
    """``text`` (the value of ``option``) parsed as a JSON object; ConfigError naming ``option`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(explain(f"{option} is not valid JSON", got=text, fix=fix)) from error
    if not isinstance(value, dict):
        raise ConfigError(explain(f"{option} must be a JSON object", got=text))
    return value


def read_json_file(path: str | Path, what: str, *, error: type = DataError, expected: str | None = None,
                   fix: str | None = None) -> dict:
    """The JSON object in ``path`` (``what`` names the file in messages): ``error`` when it cannot be read or
    parsed, or when it is not a JSON object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as problem:
        raise error(explain(f"cannot read {what}", got=f"{path}: {problem}", expected=expected, fix=fix)) from problem
    if not isinstance(value, dict):
        raise error(explain(f"{what} must hold a JSON object",
                            got=f"{path}: {type(value).__name__}", expected=expected, fix=fix))
    return value


def model_from_factory(args: argparse.Namespace, spec: str | None = None) -> Any:
    """``load_factory(spec or args.model)(**json(args.factory_kwargs))``: the factory's model, unwrapped."""
    from .._loading import load_factory

    kwargs = parse_json_object(args.factory_kwargs, "--factory-kwargs", FACTORY_FIX)
    return load_factory(spec if spec is not None else args.model)(**kwargs)


def build_model(args: argparse.Namespace) -> Any:
    """The factory's model with each ``--trained`` result loaded in order, wrapped to the protocol, on ``--device``."""
    from ..protocol import wrap_model
    from ..trained import apply_trained

    model = model_from_factory(args)
    for result in _read_trained_in_order(args, keep_weights=True):
        model = apply_trained(model, result)  # logs what it loaded from where
    model = wrap_model(model)
    return model if args.device is None else model.to(args.device)


def _mismatch(args: argparse.Namespace, error: type, message: str) -> None:
    """``error(message)``, or a warning with ``--allow-provenance-mismatch``."""
    if not getattr(args, "allow_provenance_mismatch", False):
        raise error(message)
    logger.warning("%s (going on: %s)", message, OVERRIDE_FLAG)


def _named(sources: list[dict[str, Any]]) -> str:
    """``runs/stage1 (weights 1a2b3c4d)`` for each source, or what having none means."""
    return ", then ".join(f"{s['path']} (weights {str(s['fingerprint'])[:8]})" for s in sources) \
        or "nothing (the factory's model)"


def _read_trained_in_order(args: argparse.Namespace, *, keep_weights: bool) -> list[Any]:
    """The ``--trained`` results in order (or their summaries), each checked to go on what it was trained on."""
    from ..trained import read_trained

    paths = [str(p) for p in getattr(args, "trained", None) or ()]
    cached = getattr(args, "_trained_sources", None)
    if not keep_weights and cached is not None and cached[0] == paths:
        return cached[1]
    results, sources = [], []
    for path in paths:
        result = read_trained(path)
        made_with = result.made_with
        source = {"path": path, "fingerprint": result.fingerprint, "made_with": made_with}
        if made_with is None:
            logger.info("--trained %s does not record what it was trained with (written before results recorded "
                        "it): its base and its preprocessing are not checked", path)
        elif "base" not in made_with:  # trained in Python without made_with={"base": ...}: the base is unknown
            logger.info("--trained %s does not record the results it was trained on: their order is not checked", path)
        else:
            base = [b for b in made_with.get("base") or () if isinstance(b, dict)]
            if [b.get("fingerprint") for b in base] != [s["fingerprint"] for s in sources]:
                order = " ".join(f"--trained {b.get('path')}" for b in base) + f" --trained {path}"
                _mismatch(args, CheckpointError, explain(
                    f"--trained {path} was trained on top of {_named(base)}, but here it goes on top of "
                    f"{_named(sources)}", fix=f"pass the results in the order they were trained ({order.strip()}), "
                                              f"or {OVERRIDE_FLAG} to load it anyway"))
        sources.append(source)
        results.append(result if keep_weights else source)
    args._trained_sources = (paths, sources)
    return results


def trained_sources(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``[{"path", "fingerprint", "made_with"}, ...]`` of the ``--trained`` results, in order (read once)."""
    return _read_trained_in_order(args, keep_weights=False)


def made_with(args: argparse.Namespace) -> dict[str, Any]:
    """``Trainer(made_with=...)`` of a training command: ``base``, the ``--trained`` results it started from."""
    return {"base": [{"path": s["path"], "fingerprint": s["fingerprint"]} for s in trained_sources(args)]}


def _recorded_preprocessing(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(``--trained PATH`` or ``--bank PATH``, the image preprocessing it recorded) for each that did."""
    recorded = [(f"--trained {s['path']}", s["made_with"]["preprocessing"]) for s in trained_sources(args)
                if isinstance((s["made_with"] or {}).get("preprocessing"), dict)]
    bank = getattr(args, "bank", None)
    if isinstance(bank, str) and bank:
        from ..negatives.bank_format import bank_preprocessing, read_bank_header

        if (found := bank_preprocessing(read_bank_header(bank), bank)) is not None:
            recorded.append((f"--bank {bank}", found))
    return recorded


def _as_flags(preprocessing: dict[str, Any]) -> str:
    """``--transform clip --image-size 224`` for a named transform's description, else the description."""
    kind, size = preprocessing.get("kind"), preprocessing.get("size")
    if kind not in TRANSFORM_NAMES:
        return json.dumps(preprocessing, sort_keys=True)
    return f"--transform {kind}" + (f" --image-size {size}" if size is not None else "")


def resolve_preprocessing(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Fill ``--transform`` / ``--image-size`` when not given: from the first ``--trained`` result or ``--bank``
    that recorded a named transform, else clip / 224. Returns what was recorded, for :func:`check_preprocessing`."""
    recorded = _recorded_preprocessing(args)
    if getattr(args, "transform", None) is None or getattr(args, "image_size", None) is None:
        where, found = next(((w, p) for w, p in recorded if p.get("kind") in TRANSFORM_NAMES), (None, {}))
        if args.transform is None:
            args.transform = found.get("kind") or DEFAULT_TRANSFORM
        if args.image_size is None:
            args.image_size = found.get("size") or DEFAULT_IMAGE_SIZE
        if where is not None:
            logger.info("images preprocessed as %s recorded: %s", where, _as_flags(found))
    return recorded


def check_preprocessing(args: argparse.Namespace, images: Any, recorded: list[tuple[str, dict[str, Any]]]) -> None:
    """DataError (a warning with ``--allow-provenance-mismatch``) when ``images`` (an ImageStore) are
    preprocessed otherwise than a ``--trained`` result or ``--bank`` recorded, naming both sides."""
    from ..data.images import preprocessing_differences

    describe = getattr(images, "preprocessing", None)
    here = describe() if callable(describe) else None
    for where, theirs in recorded:
        if here is None or not (differ := preprocessing_differences(here, theirs)):
            continue
        _mismatch(args, DataError, explain(
            f"the images here are preprocessed otherwise than {where} recorded",
            got=f"{_as_flags(here)} here, {_as_flags(theirs)} for {where} (differing: {', '.join(differ)})",
            fix=f"leave out --transform and --image-size to use the recorded preprocessing, pass "
                f"{_as_flags(theirs)}, or {OVERRIDE_FLAG} to go on anyway"))


def add_transform_arguments(parser: argparse.ArgumentParser, *, recorded: bool = True) -> None:
    """``--transform`` and ``--image-size``: None until :func:`resolve_preprocessing` fills them from what the
    ``--trained`` results or ``--bank`` recorded; with ``recorded=False`` (a command without those) clip / 224."""
    what = "image preprocessing ('none': no resize, no normalisation: [0, 1] floats)"
    if not recorded:
        parser.add_argument("--transform", default=DEFAULT_TRANSFORM, choices=TRANSFORM_NAMES,
                            help=f"{what}, as the training and build-bank runs will use it (default: "
                                 f"{DEFAULT_TRANSFORM})")
        parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                            help=f"image side in pixels (default: {DEFAULT_IMAGE_SIZE})")
        return
    parser.add_argument("--transform", default=None, choices=TRANSFORM_NAMES,
                        help=f"{what} (default: the one the --trained results or --bank recorded, else "
                             f"{DEFAULT_TRANSFORM}; another than recorded is an error unless {OVERRIDE_FLAG})")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in pixels (default: as recorded, like --transform, else "
                             f"{DEFAULT_IMAGE_SIZE})")


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
    add_transform_arguments(parser)
    parser.add_argument("--on-bad-record", default="error", choices=("error", "skip"),
                        help="a malformed annotation record stops the run (error, default) or is logged, counted "
                             "and skipped (skip)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="decode every image first and drop those that cannot be read (missing, empty, "
                             "corrupt, over the pixel limit) with the queries that use them: logged and counted; "
                             "default: stop at the first one")


def load_dataset(args: argparse.Namespace, split: str | None = None, category: str | None = None) -> Any:
    """The :class:`~cir_plugins.data.split.Split` the dataset flags name (``split`` overrides ``--split``), less
    its unreadable images and their queries with ``--skip-unreadable`` (ids in ``split.info["unreadable"]``)."""
    from ..data.fashioniq import load_split

    if category is None and isinstance(getattr(args, "category", None), str):
        category = args.category
    recorded = resolve_preprocessing(args)
    loaded = load_split(args.root, args.dataset, split or args.split, category, transform=args.transform,
                        size=args.image_size, on_bad_record=args.on_bad_record)
    check_preprocessing(args, loaded.images, recorded)
    return without_unreadable(loaded) if getattr(args, "skip_unreadable", False) else loaded


def without_unreadable(split: Any) -> Any:
    """``split`` less its unreadable images and the triplets that use them (reference, target, subset member)."""
    def used(t: Triplet) -> list[str]:  # the images a query needs: reference, target, CIRR subset members
        return [i for i in (t.reference, t.target, *(t.members or ())) if i is not None]

    ids = list(dict.fromkeys([*split.gallery_ids, *(i for t in split.triplets for i in used(t))]))
    readable = set(split.images.readable_ids(ids))
    unreadable = [i for i in ids if i not in readable]
    triplets = [t for t in split.triplets if all(i in readable for i in used(t))]
    if unreadable:
        logger.warning("%s %s: skipped %d unreadable images and the %d queries that use them (--skip-unreadable); "
                       "e.g. %s", split.dataset, split.split, len(unreadable), len(split.triplets) - len(triplets),
                       unreadable[:3])
    return dataclasses.replace(split, gallery_ids=[i for i in split.gallery_ids if i in readable], triplets=triplets,
                               info={**split.info, "unreadable": unreadable,
                                     "queries_dropped": len(split.triplets) - len(triplets)})


def drop_unreadable_triplets(triplets: list[Triplet], split: Any, what: str) -> list[Triplet]:
    """``triplets`` (e.g. read from ``--generated``) less those that use an image ``--skip-unreadable`` dropped."""
    bad = set(split.info.get("unreadable", ()))
    kept = [t for t in triplets if t.reference not in bad and t.target not in bad]
    if len(kept) < len(triplets):
        logger.warning("dropped %d %s that use unreadable images (--skip-unreadable)", len(triplets) - len(kept), what)
    return kept


def add_groups_arguments(parser: argparse.ArgumentParser) -> None:
    """``--groups`` (a JSON file), ``--dedup`` (the default) and ``--no-dedup``."""
    parser.add_argument("--groups", default=None, help="JSON object image id -> duplicate-group id")
    parser.add_argument("--dedup", action="store_true",
                        help="group pixel-identical images (the default unless --groups is given; overrides --groups)")
    parser.add_argument("--no-dedup", action="store_true", help="one row per image id: pixel-identical copies stay "
                                                                "separate rows (negatives of each other)")


def read_groups(args: argparse.Namespace, split: Any, show_progress: bool) -> dict[str, str] | None:
    """Duplicate groups: pixel-identical images (default, ``--dedup``), ``--groups``, or None with ``--no-dedup``."""
    if args.dedup and args.no_dedup:
        raise ConfigError(explain("--dedup and --no-dedup contradict each other", fix="pass one of them"))
    if args.dedup or (args.groups is None and not args.no_dedup):
        from ..data.dedup import find_duplicates

        return find_duplicates(list(split.gallery_ids), split.images, show_progress=show_progress)
    if args.groups is None:
        return None
    groups = read_json_file(args.groups, "the groups file", expected="a JSON object image id -> group id")
    bad = next(((k, v) for k, v in groups.items() if not isinstance(v, str)), None)
    if bad is not None:  # JSON object keys are always strings
        raise DataError(explain("the groups file must be a JSON object of strings", got=f"{args.groups}: {bad}",
                                expected="image id -> group id"))
    return groups


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress auto|always|never`` and its short form ``--no-progress``."""
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                        help="progress bars on stderr: auto (only when stderr is a terminal, default), always, never")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const="never",
                        help="the same as --progress never")


def show_progress(args: argparse.Namespace) -> bool | str:
    """The library's ``show_progress`` for ``--progress``: True (a bar on a terminal), "always" or False."""
    return {"auto": True, "always": "always", "never": False}[args.progress]


_NOT_FLAGS = ("output_dir", "show_progress")  # config fields that other flags set: --out, --progress


def _parser_of(kind: Any) -> tuple[Any, int | None]:
    """(argparse ``type``, ``nargs``) for a config field of type ``kind``; 'none' reads as None for Optional fields."""
    args = typing.get_args(kind)
    optional = type(None) in args
    if optional:
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is tuple:
        return typing.get_args(kind)[0], len(typing.get_args(kind))
    if isinstance(kind, types.UnionType) or kind not in (int, float, str):
        return None, None

    def parse(text: str) -> Any:
        return None if optional and text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse, None


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per training-config field, help from its doc and default; bools get ``--x`` / ``--no-x``."""
    from ..training.config import AMP_MODES, SCHEDULES, field_docs

    choices = {"schedule": SCHEDULES, "amp": AMP_MODES}
    docs, hints, defaults = field_docs(config_cls), typing.get_type_hints(config_cls), config_cls()
    group = parser.add_argument_group(f"{config_cls.__name__} fields")
    for f in dataclasses.fields(config_cls):
        if f.name in _NOT_FLAGS:
            continue
        flag, default = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name)
        text = f"{docs.get(f.name, f.name)} (default: {default})".replace("%", "%%")
        if hints[f.name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            continue
        kind, nargs = _parser_of(hints[f.name])
        if kind is None:
            continue
        group.add_argument(flag, type=kind, nargs=nargs, default=default, choices=choices.get(f.name), help=text,
                           metavar=f.name.upper() if nargs else None)


def config_from_args(config_cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """``config_cls`` from the flags :func:`add_config_arguments` declared, with ``fixed`` fields set."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
              if f.name not in _NOT_FLAGS and hasattr(args, f.name)}
    return config_cls(**{**values, **fixed})


def add_training_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """The flags both training commands share: model, data, output, validation, config fields, progress."""
    add_model_arguments(parser)
    add_dataset_arguments(parser)
    parser.add_argument("--generated", action="append", default=None, metavar="FILE",
                        help="JSON file of generated triplets to mix in (what cir-plugins augment writes); repeatable")
    parser.add_argument("--out", required=True,
                        help="output folder: checkpoints/{last,best}, history.json; load it with --trained OUT")
    parser.add_argument("--resume", action="store_true", help="continue from {out}/checkpoints/last")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: continue although the triplets or the bank differ from the checkpoint's")
    parser.add_argument("--val-split", default=None, help="split to evaluate after each epoch (e.g. val); the best "
                                                          "epoch by --select-metric is kept as {out}/checkpoints/best")
    parser.add_argument("--select-metric", default="Rmean",
                        help="with --val-split: the metric that picks the best epoch (a key of the evaluation's "
                             "result, default: Rmean)")
    parser.add_argument("--select-mode", choices=("max", "min"), default="max",
                        help="with --val-split: 'max' for recall-like metrics (default), 'min' for loss-like ones")
    parser.add_argument("--min-val-change", type=_number_or_none, default=1.0, metavar="X",
                        help="with --val-split: evaluate once before training too, and warn (naming the learning "
                             "rate) when after half the epochs the --select-metric has moved less than X from that "
                             "start; 'none': no check (default: 1.0, a point of a recall in percent)")
    add_config_arguments(parser, config_cls)
    add_progress_argument(parser)


def _number_or_none(text: str) -> float | None:
    """A flag's number, or None for 'none'."""
    return None if text.lower() == "none" else float(text)


_number_or_none.__name__ = "float"  # argparse names the type in its error message


def training_triplets(args: argparse.Namespace, split: Any, *, annotated: bool = True) -> list[Triplet]:
    """The split's triplets (unless ``annotated`` is False) plus every ``--generated`` file's."""
    triplets = list(split.triplets) if annotated else []
    for path in args.generated or ():
        triplets += drop_unreadable_triplets(read_generated(path), split, f"generated triplets of {path}")
    if not triplets:
        raise DataError(explain("no training triplets", got=f"{args.dataset} {args.split}"
                                + ("" if annotated else " with --generated-only"),
                                fix="pass --generated FILE (from cir-plugins augment) or a split with triplets"))
    return triplets


LONG_TEXT = ("target", "truncate", "keep")


def add_long_text_argument(parser: argparse.ArgumentParser) -> None:
    """``--long-text``: a generated text the CIR model's tokenizer cannot take is replaced by the target caption
    alone (the release's rule, default), cut to its leading words that fit, or left to the tokenizer's own cut
    (which can fall inside the target's description); annotated texts are never changed."""
    parser.add_argument("--long-text", default="target", choices=LONG_TEXT,
                        help="a generated text longer than the model's tokenizer limit: 'target' = replaced by the "
                             "target caption alone, as the release does (default), 'truncate' = its leading words "
                             "that fit, 'keep' = cut by the tokenizer")


def fit_generated(args: argparse.Namespace, model: Any, triplets: list) -> list:
    """``triplets`` with generated texts over the model's limit handled by ``--long-text``; prints the count."""
    from ..positives.templates import fit_generated_texts, text_limit_of

    policy = getattr(args, "long_text", "target")
    if policy == "keep" or not any(t.source == "generated" for t in triplets):
        return triplets
    limit = text_limit_of(model)
    if not limit:
        logger.info("the model exposes no tokenizer limit (max_text_tokens / count_text_tokens, or a tokenizer with "
                    "max_length): generated texts are used as they are")
        return triplets
    fitted, counts = fit_generated_texts(triplets, fallback=policy, **limit)
    what = "replaced by the target caption" if policy == "target" else "truncated"
    print(f"generated texts over the model's {limit['max_tokens']}-token limit: {counts['fallbacks']} of "
          f"{counts['texts']} {what}"
          + (f"; {counts['no_caption']} without a target caption kept as they are" if counts["no_caption"] else ""))
    return fitted


def val_evaluator(args: argparse.Namespace) -> Any:
    """The :class:`~cir_plugins.Evaluator` of ``--val-split`` by ``--select-metric`` / ``--select-mode`` (or None)."""
    if not args.val_split:
        return None
    from ..training.evaluator import Evaluator

    return Evaluator.on_split(load_dataset(args, split=args.val_split), metric=args.select_metric,
                              mode=args.select_mode, min_change=getattr(args, "min_val_change", None),
                              show_progress=show_progress(args))


def fit_and_report(trainer: Any, args: argparse.Namespace) -> int:
    """``trainer.fit``, ``{out}/history.json``, one rounded line per epoch."""
    from .._atomic import atomic_write_json, check_writable

    path = check_writable(Path(args.out) / "history.json")  # a read-only --out: now, not after the first epoch
    history = trainer.fit(resume=args.resume, allow_data_change=getattr(args, "allow_data_change", False))
    atomic_write_json(path, history, indent=1, make_parents=True)
    for entry in history:
        metrics = format_values(entry.get("metrics", {}))
        print(f"epoch {entry['epoch']}: loss {entry['loss']:.4f} ({entry['time']:.1f} s)"
              + (f"; {metrics}" if metrics else ""))
    print(f"wrote {args.out} (load it with --trained {args.out})")
    return 0
