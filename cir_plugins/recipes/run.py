"""Run a recipe end to end with the library's own pieces, nothing else: generate
(:class:`~cir_plugins.positives.augmenter.TripletAugmenter`), bank
(:meth:`~cir_plugins.negatives.bank.NegativeBank.build`), stage 2
(:class:`~cir_plugins.training.stage2.Stage2Trainer`; the zero-shot rows first run
:class:`~cir_plugins.training.stage1.Stage1Trainer` on the generated triplets), evaluate
(:func:`~cir_plugins.evaluation.evaluate`).

    result = reproduce(load_recipe("clip4cir-cirr"), model, "DATA/cirr", captioner=captioner,
                       output_dir="runs/clip4cir-cirr")
    result.rows()   # metric, published before / after, measured before / after

FashionIQ: the three categories' training images are one pool (partners ranked over all of them, one
bank), their triplets train together, and the best epoch is the one with the best average over the
three validation categories (Rmean = (Avg R@10 + Avg R@50) / 2).

Generated triplets come from the captioner, or from a file (``generated=``: what ``cir-plugins augment``
writes, or the release's own ``cap.*extend*`` files), which skips captioning and pairing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..data.fashioniq import CATEGORIES
from ..data.triplet import Triplet
from ..errors import ConfigError, DataError, explain
from . import Recipe

__all__ = ["TrainingData", "training_pool", "load_training_data", "load_eval_splits", "ReproduceResult", "reproduce"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """A dataset's training side as one pool.

    Fields:
        triplets: the annotated triplets that have a target (FashionIQ: the three categories').
        image_ids: every training image, each once, in file order (FashionIQ: dress, shirt, toptee).
        images: one ImageStore over ``image_ids``.
        categories: FashionIQ: image id -> category (the captioner's prompt names it); None for CIRR.
    """

    triplets: list[Triplet]
    image_ids: list[str]
    images: Any
    categories: dict[str, str] | None = None


def training_pool(splits: Sequence[Any]) -> TrainingData:
    """Several loaded training splits (FashionIQ's three categories) as one pool: their annotated triplets,
    every image once (first listing wins), one ImageStore over all of them (the splits share a root), and
    each image's category."""
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
            if image_id not in categories:  # an image listed by two categories keeps its first
                categories[image_id] = s.category
                paths[image_id] = s.images.path_of(image_id).relative_to(s.images.root).as_posix()
    first = splits[0].images
    store = ImageStore(first.root, paths, first.transform_spec, size=first.size, max_pixels=first.max_pixels)
    triplets = [t for s in splits for t in s.triplets if t.target is not None]
    return TrainingData(triplets, list(paths), store, categories)


def load_training_data(dataset: str, root: str | os.PathLike, split: str = "train", *,
                       transform: Any = "clip", size: int = 224, on_bad_record: str = "error") -> TrainingData:
    """The training pool of ``dataset`` ("cirr", "synthetic" or "fashioniq": its three categories together)."""
    from ..data.fashioniq import load_split

    if dataset == "fashioniq":
        return training_pool([load_split(root, dataset, split, category, transform=transform, size=size,
                                         on_bad_record=on_bad_record) for category in CATEGORIES])
    return training_pool([load_split(root, dataset, split, transform=transform, size=size,
                                     on_bad_record=on_bad_record)])


def load_eval_splits(dataset: str, root: str | os.PathLike, split: str = "val", *, transform: Any = "clip",
                     size: int = 224) -> Any:
    """What :func:`~cir_plugins.evaluation.evaluate` takes: one split (CIRR), or the three category splits
    (FashionIQ: per-category numbers, their averages and Rmean)."""
    from ..data.fashioniq import load_split

    if dataset == "fashioniq":
        return [load_split(root, dataset, split, category, transform=transform, size=size)
                for category in CATEGORIES]
    return load_split(root, dataset, split, transform=transform, size=size)


@dataclass
class ReproduceResult:
    """What :func:`reproduce` measured, beside what the recipe says was published.

    Fields: ``recipe``; ``before`` / ``after`` (evaluate() results of the starting model and of the
    selected stage-2 epoch); ``history`` (per-epoch stage-2 entries; ``stage1_history`` for zero-shot);
    ``augment`` (the augmenter's summary, or the generated file's name and size); ``triplets`` (counts
    by source); ``bank_shape``; ``output_dir``.
    """

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

        def get(values: Mapping | None, key: str) -> float | None:
            value = (values or {}).get(key)
            return float(value) if isinstance(value, (int, float)) else None

        return [(k, get(published.get("before"), k), get(published.get("after"), k), get(self.before, k),
                 get(self.after, k)) for k in self.metric_names()]

    def table(self) -> str:
        """The measured numbers beside the published ones, one metric a line ("-" = none)."""
        recipe, published = self.recipe, self.recipe.published or {}

        def number(value: float | None) -> str:
            return f"{value:.2f}" if value is not None else "-"

        lines = [f"{recipe.name}: {recipe.model_label} on {recipe.dataset}; measured on {recipe.evaluation['split']} "
                 f"(reference {'removed' if recipe.evaluation['remove_reference'] else 'kept'}), published on "
                 f"{published.get('split', '-')}",
                 f"{'metric':<10}{'published':>11}{'':>9}{'measured':>11}",
                 f"{'':<10}{'before':>11}{'after':>9}{'before':>11}{'after':>9}"]
        for name, p_before, p_after, m_before, m_after in self.rows():
            lines.append(f"{name:<10}{number(p_before):>11}{number(p_after):>9}{number(m_before):>11}"
                         f"{number(m_after):>9}")
        lines.append(f"triplets: {self.triplets['annotated']} annotated + {self.triplets['generated']} generated; "
                     f"bank {tuple(self.bank_shape)}; results in {self.output_dir}/results.json")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``results.json`` holds)."""
        def plain(metrics):
            return None if metrics is None else {k: v for k, v in metrics.items()}

        return {"recipe": self.recipe.to_dict(), "before": plain(self.before), "after": plain(self.after),
                "history": self.history, "stage1_history": self.stage1_history, "augment": self.augment,
                "triplets": self.triplets, "bank_shape": self.bank_shape, "output_dir": self.output_dir,
                "rows": [list(r) for r in self.rows()], **self.extra}


def _bank_ids(recipe: Recipe, data: TrainingData, triplets: Sequence[Triplet]) -> list[str]:
    if recipe.bank["images"] == "all":
        return list(data.image_ids)
    # the release's bank: the images the training triplets name, in order of first mention
    return list(dict.fromkeys(i for t in triplets for i in (t.reference, t.target)))


def reproduce(recipe: Recipe, model: Any, root: str | os.PathLike, *, output_dir: str | os.PathLike,
              captioner: Any = None, generated: str | os.PathLike | None = None, pair_encoder: Any = None,
              transform: Any = "clip", image_size: int = 224, rank_window: Any = None,
              stage2_overrides: Mapping[str, Any] | None = None, stage1_overrides: Mapping[str, Any] | None = None,
              train_stage1: bool | None = None, evaluate_before: bool = True, seed: int = 0,
              eval_batch_size: int = 64, caption_cache: str | os.PathLike | None = None,
              show_progress: bool = True) -> ReproduceResult:
    """Run ``recipe`` on ``model`` (its stage-1 checkpoint, wrapped to the protocol) and the dataset at ``root``.

    Args:
        recipe: a :class:`Recipe` (``recipe.as_release()`` for the release's values of our deliberate
            differences).
        model: the CIR model (protocol: encode_image, compose_query, ...); trained in place.
        root: the dataset root (CIRR rc2 or FashionIQ layout).
        output_dir: ``generated.json``, ``bank.safetensors``, ``stage2/`` (and ``stage1/``) checkpoints and
            ``results.json`` go here.
        captioner: a captioner (see positives.captioners) for the generation step.
        generated: a generated-triplet file to use instead of captioning (either schema, see
            :func:`~cir_plugins.positives.annotations.read_generated`). With neither, stage 2 trains on the
            annotated triplets alone (the "+N" row: more negatives, no generated positives).
        pair_encoder: the image encoder that ranks partners (default: ``model``; the release used Unicom).
        transform, image_size: the ImageStore preprocessing of every split.
        rank_window: overrides the recipe's window (e.g. fractions of N on small data); None = the recipe's.
        stage2_overrides / stage1_overrides: Stage2Config / Stage1Config fields over the recipe's
            (e.g. ``epochs`` or ``steps_per_epoch`` for a smoke run).
        train_stage1: run the recipe's in-batch stage 1 on the generated triplets first (default: when the
            recipe has one, i.e. the zero-shot rows).
        evaluate_before: also evaluate the starting model ("measured before").
        seed: the partner draw, subsample and training seed.
        eval_batch_size: images per encoder call when building the bank and evaluating.
        caption_cache: the caption cache folder (default ``{output_dir}/captions``).
        show_progress: tqdm bars.
    """
    from .._atomic import atomic_write_json
    from ..evaluation import evaluate
    from ..negatives.bank import NegativeBank
    from ..positives.annotations import read_generated, write_generated_cirr, write_generated_fashioniq
    from ..positives.augmenter import TripletAugmenter
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
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_training_data(recipe.dataset, root, transform=transform, size=image_size)
    val = load_eval_splits(recipe.dataset, root, recipe.evaluation["split"], transform=transform, size=image_size)
    remove_reference = recipe.evaluation["remove_reference"]

    def measure(m: Any) -> dict:
        return evaluate(m, val, remove_reference=remove_reference, batch_size=eval_batch_size,
                        show_progress=False)

    selection = Evaluator(measure, metric="Rmean", mode="max")  # FashionIQ: Rmean of the categories' averages
    before = measure(model) if evaluate_before else None

    # 1. more positives
    groups: dict[str, str] | None = None
    augment_info: dict | None = None
    made: list[Triplet] = []
    if generated is not None:
        made = [t for t in read_generated(generated) if t.source == "generated"]
        augment_info = {"file": str(generated), "triplets": len(made)}
    elif captioner is not None:
        kwargs = recipe.generation.augmenter_kwargs()
        if rank_window is not None:
            kwargs["rank_window"] = rank_window
        augmenter = TripletAugmenter(captioner, pair_encoder if pair_encoder is not None else model, seed=seed,
                                     dedup=recipe.bank["dedup"], cache_dir=caption_cache or out / "captions",
                                     batch_size=eval_batch_size, show_progress=show_progress, **kwargs)
        augmented = augmenter.augment(list(data.image_ids), data.images, annotated=list(data.triplets))
        made, groups, augment_info = list(augmented.triplets), dict(augmented.groups), dict(augmented.summary)
        if not made:  # a run "with generated positives" that has none would silently be the +N row
            raise DataError(explain(
                f"recipe {recipe.name}: the generation step made no triplets from {augment_info['images']} images",
                got=augmented.why_empty(kwargs["rank_window"]),
                fix="the recipe's absolute window suits the full data set: pass rank_window as fractions of N "
                    "(cir-plugins recipe run ... --rank-window fractions), or check the captioner"))
        writer = write_generated_fashioniq if recipe.dataset == "fashioniq" else write_generated_cirr
        writer(made, out / "generated.json")
    annotated = list(data.triplets) if recipe.generation.annotated else []
    triplets = annotated + made
    if not triplets:
        raise ConfigError(explain(f"recipe {recipe.name}: no training triplets", got=augment_info,
                                  fix="check the rank window against the number of images (a smaller data set "
                                      "needs rank_window as fractions of N), or the generated file"))
    logger.info("recipe %s: %d annotated + %d generated triplets", recipe.name, len(annotated), len(made))

    # zero-shot rows: in-batch stage 1 on the generated triplets before the bank
    stage1_history = None
    if train_stage1 if train_stage1 is not None else recipe.stage1_training is not None:
        config1 = recipe.stage1_config(**{"seed": seed, "output_dir": str(out / "stage1"),
                                          "show_progress": show_progress, **(stage1_overrides or {})})
        stage1_history = Stage1Trainer(model, triplets, data.images, config=config1, evaluator=selection,
                                       groups=groups).fit()  # ends on the best epoch's weights

    # 2. more negatives: the static bank (one row per group of identical images)
    bank_ids = _bank_ids(recipe, data, triplets)
    bank_groups = {i: groups[i] for i in bank_ids if i in groups} if groups and recipe.bank["dedup"] else None
    bank = NegativeBank.build(model, bank_ids, data.images, groups=bank_groups, dedup=recipe.bank["dedup"],
                              batch_size=eval_batch_size, show_progress=show_progress)
    bank.save(out / "bank.safetensors")

    # 3. stage 2 with the recipe's settings; the best epoch by the validation Rmean (FashionIQ: the average)
    config2 = recipe.stage2_config(**{"seed": seed, "output_dir": str(out / "stage2"),
                                      "show_progress": show_progress, **(stage2_overrides or {})})
    history = Stage2Trainer(model, bank, triplets, data.images, config=config2, evaluator=selection).fit()

    # 4. evaluate with the recipe's protocol
    after = measure(model)
    result = ReproduceResult(recipe=recipe, before=before, after=after, history=history, augment=augment_info,
                             triplets={"annotated": len(annotated), "generated": len(made)},
                             bank_shape=list(bank.embeddings.shape), output_dir=str(out),
                             stage1_history=stage1_history)
    atomic_write_json(out / "results.json", result.to_dict(), indent=1)
    return result
