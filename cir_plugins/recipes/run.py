"""Run a recipe end to end with the library's own pieces: generate (``TripletAugmenter``), bank
(``NegativeBank.build``), stage 2 (``Stage2Trainer``; the zero-shot rows first run ``Stage1Trainer`` on the
generated triplets), evaluate (:func:`~cir_plugins.evaluation.evaluate`).

    result = reproduce(load_recipe("clip4cir-cirr"), model, "DATA/cirr", captioner=captioner,
                       output_dir="runs/clip4cir-cirr")
    result.rows()   # metric, published before / after, measured before / after

FashionIQ: the three categories' training images are one pool (partners ranked over all, one bank), their
triplets train together, and the best epoch has the best average over the three validation categories (Rmean =
(Avg R@10 + Avg R@50) / 2). Generated triplets come from the captioner, or from a file (``generated=``: what
``cir-plugins augment`` writes, or the release's ``cap.*extend*`` files), which skips captioning and pairing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write_json
from ..data.fashioniq import CATEGORIES
from ..data.triplet import Triplet
from ..errors import ConfigError, DataError, explain
from . import Recipe

__all__ = ["TrainingData", "training_pool", "load_training_data", "load_eval_splits", "ReproduceResult", "reproduce",
           "pool_ids", "PRECISIONS", "TEXT_LENGTH", "RUN_FILE", "RESULTS_FILE"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """A dataset's training side as one pool: the annotated ``triplets`` that have a target, every training image
    once in file order (``image_ids``; FashionIQ: dress, shirt, toptee), one ImageStore over them (``images``) and
    ``categories`` (FashionIQ: image id -> category, for the captioner's prompt; None for CIRR)."""

    triplets: list[Triplet]
    image_ids: list[str]
    images: Any
    categories: dict[str, str] | None = None


def training_pool(splits: Sequence[Any]) -> TrainingData:
    """Loaded training splits (FashionIQ's three categories, sharing a root) as one pool; an image listed twice
    keeps its first category."""
    from ..data.images import ImageStore

    if len(splits) == 1:
        s = splits[0]
        categories = {i: s.category for i in s.gallery_ids} if getattr(s, "category", None) else None
        return TrainingData([t for t in s.triplets if t.target is not None], list(s.gallery_ids), s.images,
                            categories)
    categories: dict[str, str] = {}
    paths: dict[str, str] = {}
    for s in splits:
        for image_id in s.gallery_ids:
            if image_id not in categories:
                categories[image_id] = s.category
                paths[image_id] = s.images.path_of(image_id).relative_to(s.images.root).as_posix()
    first = splits[0].images
    store = ImageStore(first.root, paths, first.transform_spec, size=first.size, max_pixels=first.max_pixels)
    triplets = [t for s in splits for t in s.triplets if t.target is not None]
    return TrainingData(triplets, list(paths), store, categories)


def load_training_data(dataset: str, root: str | os.PathLike, split: str = "train", *,
                       transform: Any = "clip", size: int = 224, on_bad_record: str = "error",
                       texts: str | None = None) -> TrainingData:
    """The training pool of ``dataset`` ("cirr", "synthetic" or "fashioniq": its three categories together);
    ``texts``: FashionIQ's training texts per annotated triplet (``load_fashioniq``'s; None = its default)."""
    from ..data.fashioniq import load_split

    kwargs = {"transform": transform, "size": size, "on_bad_record": on_bad_record}
    if dataset == "fashioniq":
        extra = {"texts": texts} if texts is not None else {}
        return training_pool([load_split(root, dataset, split, c, **kwargs, **extra) for c in CATEGORIES])
    return training_pool([load_split(root, dataset, split, **kwargs)])


def load_eval_splits(dataset: str, root: str | os.PathLike, split: str = "val", *, transform: Any = "clip",
                     size: int = 224) -> Any:
    """What :func:`~cir_plugins.evaluation.evaluate` takes: one split (CIRR), or the three category splits."""
    from ..data.fashioniq import load_split

    if dataset == "fashioniq":
        return [load_split(root, dataset, split, c, transform=transform, size=size) for c in CATEGORIES]
    return load_split(root, dataset, split, transform=transform, size=size)


@dataclass
class ReproduceResult:
    """What :func:`reproduce` measured, beside what the recipe says was published: ``before`` / ``after``
    (evaluate() of the starting model and of the selected stage-2 epoch), ``history`` (per-epoch stage-2 entries;
    ``stage1_history`` for zero-shot), ``augment`` (the augmenter's summary, or the generated file's name and
    size), ``triplets`` (counts by source), ``bank_shape``, ``output_dir``."""

    recipe: Recipe
    before: dict | None
    after: dict
    history: list[dict]
    augment: dict | None
    triplets: dict[str, int]
    bank_shape: list[int]
    output_dir: str
    stage1_history: list[dict] | None = None
    extra: dict = field(default_factory=dict)

    def metric_names(self) -> list[str]:
        """The table's metrics: the published ones first, then the protocol's headline ones."""
        names = list((self.recipe.published or {}).get("after", {}))
        headline = (["Avg R@10", "Avg R@50", "Rmean"] if self.recipe.dataset == "fashioniq" else
                    ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Rmean"])
        return names + [k for k in headline if k not in names]

    def rows(self) -> list[tuple[str, float | None, float | None, float | None, float | None]]:
        """(metric, published before, published after, measured before, measured after); None = none."""
        published = self.recipe.published or {}
        columns = (published.get("before"), published.get("after"), self.before, self.after)
        return [(k, *(float(v) if isinstance(v := (values or {}).get(k), (int, float)) else None
                      for values in columns)) for k in self.metric_names()]

    def table(self) -> str:
        """The measured numbers beside the published ones, one metric a line ("-" = none)."""
        recipe, published = self.recipe, self.recipe.published or {}
        lines = [f"{recipe.name}: {recipe.model_label} on {recipe.dataset}; measured on {recipe.evaluation['split']} "
                 f"(reference {'removed' if recipe.evaluation['remove_reference'] else 'kept'}), published on "
                 f"{published.get('split', '-')}",
                 f"{'metric':<10}{'published':>11}{'':>9}{'measured':>11}",
                 f"{'':<10}{'before':>11}{'after':>9}{'before':>11}{'after':>9}"]
        for name, *values in self.rows():
            cells = [f"{v:.2f}" if v is not None else "-" for v in values]
            lines.append(f"{name:<10}{cells[0]:>11}{cells[1]:>9}{cells[2]:>11}{cells[3]:>9}")
        lines.append(f"triplets: {self.triplets['annotated']} annotated + {self.triplets['generated']} generated; "
                     f"bank {tuple(self.bank_shape)}; results in {self.output_dir}/results.json")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``results.json`` holds)."""
        return {"recipe": self.recipe.to_dict(), "before": None if self.before is None else dict(self.before),
                "after": None if self.after is None else dict(self.after),
                "history": self.history, "stage1_history": self.stage1_history, "augment": self.augment,
                "triplets": self.triplets, "bank_shape": self.bank_shape, "output_dir": self.output_dir,
                "rows": [list(r) for r in self.rows()], **self.extra}


def _named(triplets: Sequence[Triplet]) -> list[str]:
    """The images ``triplets`` name, each once, in order of first mention (reference, then target)."""
    return list(dict.fromkeys(i for t in triplets for i in (t.reference, t.target)))


def pool_ids(recipe: Recipe, data: TrainingData) -> list[str]:
    """The images generation pairs and ranks (``recipe.generation.pool``): "triplets" = those the annotated
    training triplets name, in order of first mention (as the release's script lists them); "all" = every one."""
    if recipe.generation.pool == "all":
        return list(data.image_ids)
    if not (named := _named(data.triplets)):
        raise DataError(explain(f"recipe {recipe.name}: the pool 'triplets' is the images the annotated train "
                                "triplets name, and there is none", got=len(data.triplets),
                                fix="check the dataset root (its train captions file)"))
    return named


PRECISIONS = ("ours", "release")
TEXT_LENGTH = ("target", "truncate")
RUN_FILE, STATE_FILE, RESULTS_FILE = "run.json", "run_state.json", "results.json"


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    """The dotted keys where two JSON documents differ."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in _differences(saved.get(k), now.get(k), f"{where}.{k}" if where else str(k))]
    return [] if saved == now else [where or "(document)"]


def _open_run(out: Path, manifest: dict, resume: bool) -> dict:
    """The run folder's state (what a killed run had finished). ``run.json`` records the recipe and every setting
    that changes a result: a folder of another run is refused (naming the differing keys), one of this run needs
    ``resume``."""
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(explain(f"{run_file} is unreadable ({error})",
                                      fix="choose a new --out, or restore the file")) from error
        differ = _differences(saved, manifest)
        if differ:
            raise ConfigError(explain(f"{out} holds a run of other settings or another recipe", got=differ[:12],
                                      fix="choose a new output folder (--out), or rerun with the settings in "
                                          f"{run_file}"))
        if not resume:
            raise ConfigError(explain(f"{out} already holds this run", got=str(run_file),
                                      fix="pass resume=True (--resume) to continue it, or choose a new --out"))
        state_file = out / STATE_FILE
        state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
        logger.info("resuming the run in %s (done: %s)", out, ", ".join(sorted(state)) or "nothing")
        return state
    if resume:
        logger.info("resume: %s holds no run yet; starting it", out)
    atomic_write_json(run_file, manifest, indent=1)
    return {}


def _save_state(out: Path, state: dict) -> None:
    atomic_write_json(out / STATE_FILE, state, indent=1)


def reproduce(recipe: Recipe, model: Any, root: str | os.PathLike, *, output_dir: str | os.PathLike,
              captioner: Any = None, generated: str | os.PathLike | None = None, pair_encoder: Any = None,
              transform: Any = "clip", image_size: int = 224, rank_window: Any = None,
              stage2_overrides: Mapping[str, Any] | None = None, stage1_overrides: Mapping[str, Any] | None = None,
              train_stage1: bool | None = None, evaluate_before: bool = True, seed: int = 0,
              eval_batch_size: int = 64, caption_cache: str | os.PathLike | None = None,
              text_length: str = "target", precision: str = "ours", resume: bool = False,
              settings: Mapping[str, Any] | None = None, show_progress: bool = True) -> ReproduceResult:
    """Run ``recipe`` on ``model`` (its stage-1 checkpoint, wrapped to the protocol) and the dataset at ``root``.

    Args:
        recipe: a :class:`Recipe` (``recipe.as_release()``: the release's values of our deliberate differences).
        model: the CIR model (protocol: encode_image, compose_query, ...); trained in place.
        root: the dataset root (CIRR rc2 or FashionIQ layout).
        output_dir: ``run.json`` (recipe and settings), ``generated.json`` (+ ``groups.json``), ``bank.safetensors``
            (+ its shard cache ``bank_shards/``), ``stage2/`` (+ ``stage1/``) checkpoints, ``run_state.json`` (the
            steps done) and ``results.json`` (written last: without it the run has not finished).
        captioner: a captioner (positives.captioners) for the generation step, or ``generated``: a triplet file
            instead (either schema, :func:`~cir_plugins.positives.annotations.read_generated`). With neither,
            stage 2 trains on the annotated triplets alone (the "+N" row: more negatives, no generated positives).
        pair_encoder: the image encoder that ranks partners (default: ``model``; the release used Unicom
            ViT-L/14); one with an ``image_transform`` (e.g. ``load_image_encoder``'s) gets its preprocessing.
        transform, image_size: the ImageStore preprocessing of every split.
        rank_window: overrides the recipe's window (e.g. fractions of N on small data); None = the recipe's.
        stage2_overrides / stage1_overrides: Stage2Config / Stage1Config fields over the recipe's.
        train_stage1: run the recipe's in-batch stage 1 on the generated triplets first (default: when the recipe
            has one, i.e. the zero-shot rows).
        evaluate_before: also evaluate the starting model ("measured before").
        seed: the partner draw, subsample and training seed.
        eval_batch_size: images per encoder call when building the bank and evaluating.
        caption_cache: the caption cache folder (default ``{output_dir}/captions``).
        text_length: a generated text longer than the model's tokenizer takes (``text_limit_of(model)``):
            "target" (as the release: the target caption alone) or "truncate"; a model that declares no limit
            keeps its texts (its tokenizer cuts them).
        precision: "ours" (``amp="auto"``: bf16 autocast and a bf16 bank on CUDA) or "release" (fp16 autocast with
            a GradScaler and a float32 bank, as the release trains; CUDA only).
        resume: continue the run in ``output_dir``: generation, the checkpoints and the bank's shard cache are
            reused; a folder of other settings is refused.
        settings: more JSON-ready settings that identify the run (a resumed run must have the same).
        show_progress: tqdm bars.

    Generation keeps pairs with two equal captions, as the release does. A recipe's ``generation.rewriter``
    rewrites the generated texts with :class:`~cir_plugins.LLMRewriter` on the model's device (cached beside the
    captions).
    """
    from .._utils import model_device
    from ..evaluation import evaluate
    from ..negatives.bank import NegativeBank
    from ..positives.annotations import read_generated, write_generated_cirr, write_generated_fashioniq
    from ..positives.augmenter import TripletAugmenter
    from ..positives.templates import fit_generated_texts, text_limit_of
    from ..training.evaluator import Evaluator
    from ..training.stage1 import Stage1Trainer
    from ..training.stage2 import Stage2Trainer

    if not isinstance(recipe, Recipe):
        raise ConfigError(explain("reproduce needs a Recipe", got=type(recipe).__name__,
                                  fix="pass cir_plugins.recipes.load_recipe(name)"))
    if captioner is not None and generated is not None:
        raise ConfigError(explain("give one source of generated triplets: a captioner or a generated file",
                                  got={"captioner": captioner.name if hasattr(captioner, "name") else captioner,
                                       "generated": str(generated)},
                                  fix="pass captioner=... (generate here) or generated=PATH (skip captioning)"))
    if precision not in PRECISIONS:
        raise ConfigError(explain("unknown precision", got=precision, expected=PRECISIONS))
    if text_length not in TEXT_LENGTH:
        raise ConfigError(explain("unknown text_length policy", got=text_length, expected=TEXT_LENGTH))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    window = rank_window if rank_window is not None else recipe.generation.window_or_any
    train_first = train_stage1 if train_stage1 is not None else recipe.stage1_training is not None
    if precision == "release" and model_device(model).type != "cuda":
        raise ConfigError(explain("precision 'release' is fp16 autocast with a GradScaler, which needs a CUDA device",
                                  got=str(model_device(model)), fix="run on a GPU, or use precision 'ours'"))
    recipe_dict = recipe.to_dict()
    manifest = json.loads(json.dumps({
        # what changes a result: the recipe's settings (not its notes) and the run's
        "recipe": {k: recipe_dict.get(k) for k in ("name", "generation", "bank", "stage2", "stage1_training",
                                                   "evaluation")},
        "settings": {"seed": seed, "rank_window": list(window) if isinstance(window, (tuple, list)) else window,
                     "captioner": getattr(captioner, "name", None) if captioner is not None else None,
                     "generated": str(generated) if generated is not None else None,
                     "pair_encoder": getattr(pair_encoder, "name", None) if pair_encoder is not None else "model",
                     "transform": transform if isinstance(transform, (str, type(None))) else repr(transform),
                     "image_size": image_size, "stage2_overrides": dict(stage2_overrides or {}),
                     "stage1_overrides": dict(stage1_overrides or {}), "train_stage1": train_first,
                     "text_length": text_length, "precision": precision, **dict(settings or {})}},
        default=str))
    state = _open_run(out, manifest, resume)
    data = load_training_data(recipe.dataset, root, transform=transform, size=image_size,
                              texts=recipe.generation.annotated_texts)
    val = load_eval_splits(recipe.dataset, root, recipe.evaluation["split"], transform=transform, size=image_size)
    remove_reference = recipe.evaluation["remove_reference"]

    def measure(m: Any) -> dict:
        return evaluate(m, val, remove_reference=remove_reference, batch_size=eval_batch_size, show_progress=False)

    selection = Evaluator(measure, metric="Rmean", mode="max")  # FashionIQ: Rmean of the categories' averages
    if "before" not in state:
        state["before"] = measure(model) if evaluate_before else None
        _save_state(out, state)

    # 1. more positives; the length policy: a text the model's tokenizer cannot take -> the target caption
    limit = text_limit_of(model)
    length = {**limit, "fallback": text_length} if limit else {}
    groups: dict[str, str] | None = None
    made: list[Triplet] = []

    def generated_in(path: Any) -> list[Triplet]:
        return [t for t in read_generated(path) if t.source == "generated"]

    if "augment" in state:  # generated (or read) before the run was stopped
        made = generated_in(out / "generated.json") if (out / "generated.json").is_file() else []
        groups = json.loads((out / "groups.json").read_text()) if (out / "groups.json").is_file() else None
        augment_info = state["augment"]
    elif generated is not None:
        made = generated_in(generated)
        augment_info = {"file": str(generated), "triplets": len(made)}
        if limit:
            made, counts = fit_generated_texts(made, **length)
            augment_info["text_fallbacks"] = counts
    elif captioner is not None:
        rewriter = None
        if recipe.generation.rewriter:  # the recipe's rewriter spec: on the model's device, drawn with the run's seed
            from ..positives.rewriters import rewriter_from_spec

            rewriter = rewriter_from_spec(recipe.generation.rewriter, device=model_device(model), seed=seed)
        config = dataclasses.replace(recipe.generation, rank_window=window, seed=seed,
                                     dedup=recipe.bank["dedup"], batch_size=eval_batch_size,
                                     **{k: v for k, v in length.items() if k != "count_tokens"})
        encoder = pair_encoder if pair_encoder is not None else model
        own = getattr(encoder, "image_transform", None)  # a named encoder's own preprocessing
        pool = pool_ids(recipe, data)
        pair_images = data.images.with_transform(own) if callable(own) else data.images
        augmenter = TripletAugmenter(captioner, encoder, config=config, rewriter=rewriter,
                                     count_tokens=length.get("count_tokens"),
                                     cache_dir=caption_cache or out / "captions", show_progress=show_progress)
        augmented = augmenter.augment(pool, pair_images, annotated=list(data.triplets))
        made, groups, augment_info = list(augmented.triplets), dict(augmented.groups), dict(augmented.summary)
        augment_info["pool"] = {"kind": recipe.generation.pool, "images": len(pool)}
        if not made:  # a run "with generated positives" that has none would silently be the +N row
            raise DataError(explain(
                f"recipe {recipe.name}: the generation step made no triplets from {augment_info['images']} images",
                got=augmented.why_empty(window),
                fix="the recipe's absolute window suits the full data set: pass rank_window as fractions of N "
                    "(cir-plugins recipe run ... --rank-window fractions), or check the captioner"))
    else:
        augment_info = None
    if "augment" not in state:
        if made:
            writer = write_generated_fashioniq if recipe.dataset == "fashioniq" else write_generated_cirr
            writer(made, out / "generated.json")
            made = generated_in(out / "generated.json")  # as read back: a resumed run trains on exactly these
        if groups is not None:
            atomic_write_json(out / "groups.json", groups)
        state["augment"] = augment_info
        _save_state(out, state)
    annotated = list(data.triplets) if recipe.generation.annotated else []
    triplets = annotated + made
    if not triplets:
        raise ConfigError(explain(f"recipe {recipe.name}: no training triplets", got=augment_info,
                                  fix="check the rank window against the number of images (a smaller data set "
                                      "needs rank_window as fractions of N), or the generated file"))
    logger.info("recipe %s: %d annotated + %d generated triplets", recipe.name, len(annotated), len(made))

    def mix(overrides: Mapping[str, Any] | None, section: Mapping[str, Any]) -> dict:
        """The recipe's annotated share, unless there is only one kind of triplet to sample."""
        extra = {}
        if "annotated_fraction" not in (overrides or {}) and section.get("annotated_fraction") is not None \
                and (not annotated or not made):
            extra["annotated_fraction"] = None  # one kind only: every triplet is one sample
        if precision == "release":
            extra["amp"] = "fp16"  # the release: torch.cuda.amp autocast (fp16) with a GradScaler
        return {**extra, **dict(overrides or {})}

    # zero-shot rows: in-batch stage 1 on the generated triplets before the bank
    stage1_history = None
    if train_first:
        config1 = recipe.stage1_config(**{"seed": seed, "output_dir": str(out / "stage1"),
                                          "show_progress": show_progress,
                                          **mix(stage1_overrides, recipe.stage1_training or {})})
        stage1_history = Stage1Trainer(model, triplets, data.images, config=config1, evaluator=selection,
                                       groups=groups).fit(resume=resume)  # ends on the best epoch's weights

    # 2. more negatives: the static bank (one row per group of identical images); its shard cache lets a
    # stopped build (or a resumed run) reuse every row already encoded
    bank_ids = list(data.image_ids) if recipe.bank["images"] == "all" else _named(triplets)  # "triplets": the release's
    # the augmenter's groups cover only the images it paired (the recipe's pool): reuse them only when they cover
    # every bank image, else the bank finds the groups of all of them itself, so that no copy of a target outside
    # the pool becomes its negative
    covered = groups is not None and all(i in groups for i in bank_ids)
    bank_groups = {i: groups[i] for i in bank_ids} if covered and recipe.bank["dedup"] else None
    bank = NegativeBank.build(model, bank_ids, data.images, groups=bank_groups, dedup=recipe.bank["dedup"],
                              batch_size=eval_batch_size, show_progress=show_progress, cache_dir=out / "bank_shards",
                              dtype=torch.float32 if precision == "release" else None)
    bank.save(out / "bank.safetensors")

    # 3. stage 2 with the recipe's settings; the best epoch by the validation Rmean (FashionIQ: the average)
    config2 = recipe.stage2_config(**{"seed": seed, "output_dir": str(out / "stage2"),
                                      "show_progress": show_progress, **mix(stage2_overrides, recipe.stage2)})
    history = Stage2Trainer(model, bank, triplets, data.images, config=config2, evaluator=selection).fit(resume=resume)

    # 4. evaluate with the recipe's protocol
    result = ReproduceResult(recipe=recipe, before=state["before"], after=measure(model), history=history,
                             augment=augment_info, triplets={"annotated": len(annotated), "generated": len(made)},
                             bank_shape=list(bank.embeddings.shape), output_dir=str(out), stage1_history=stage1_history)
    atomic_write_json(out / RESULTS_FILE, result.to_dict(), indent=1)
    return result
