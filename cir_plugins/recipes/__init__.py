"""The paper's settings per base model and dataset, as data: one JSON file per recipe in this folder.

    from cir_plugins.recipes import load_recipe
    recipe = load_recipe("clip4cir-fashioniq")
    recipe.generation                             # an AugmentConfig: templates, rank_window, refer_only, ...
    recipe.stage2_config(output_dir="runs/s2")    # a validated Stage2Config
    recipe.evaluation["remove_reference"]         # True: the release removed it for its CLIP4Cir rows

``cir-plugins recipe list`` / ``recipe show NAME`` print them; ``cir-plugins recipe run NAME`` runs one end to
end (:func:`cir_plugins.recipes.run.reproduce`). A recipe file holds (:func:`load_recipe` checks every field;
an unknown or missing key is a ConfigError naming the file and the key):

- ``name`` (= the file name), ``model`` (:data:`MODELS`), ``model_label``, ``dataset`` (cirr, fashioniq),
  ``stage1`` (the checkpoint the paper starts stage 2 from), ``trains`` (what stage 2 trains in the release;
  the model's own wrap decides here), ``fusion`` (how the query is composed).
- ``start``: the pieces of the printed command: ``checkpoint`` (the release's starting file), ``convert`` (the
  command making a folder the factory reads; null when none is needed or exists), ``model`` (the factory spec;
  ``YOUR_*.py`` where there is no example model), ``factory_kwargs``, ``trained`` (a stage-1 result for
  ``--trained``; null when the factory loads the checkpoint) and ``args`` (further flags).
- ``generation``: :class:`Generation` fields. ``rank_window`` null = any image; the release counts the image
  itself as rank 0, ours starts at the most similar other image, so the same numbers sit one rank apart. On
  FashionIQ the three categories are ranked together; ``annotated_texts`` "release" = the release's four texts,
  "both_orders" = the loader's default two.
- ``bank``: ``dedup`` (one row per group of pixel-identical images) and ``images`` ("all" or "triplets").
- ``stage2``: :class:`~cir_plugins.training.config.Stage2Config` fields; ``annotated_fraction`` is the release's
  annotated share among the samples its commands produce (uniform over annotated + generated), derived in
  ``sources["annotated_fraction"]`` (where the generated count is only bounded, the bound).
- ``stage1_training`` (optional, the zero-shot rows): Stage1Config fields of the in-batch stage 1.
- ``evaluation``: ``protocol``, ``split``, ``remove_reference`` (CIRR always; on FashionIQ the standard protocol
  keeps the reference, the release removed it for CLIP4Cir and zero-shot, kept it for SPRC, BLIP4CIR, TG-CIR).
- ``published``: ``split`` and the ``before`` / ``after`` numbers of docs/method.md section 7 (null when none);
  ``notes``, ``sources``: where each number comes from and what a reader should know.

Where this project deliberately differs from the release, the recipe holds our value and
:meth:`Recipe.as_release` gives the release's (:data:`RELEASE_VALUES`): ``stage2.mask_reference`` True (the
query's reference row out of its softmax, as evaluation removes it; the release keeps it as a negative) and
``bank.images`` "all" (the release's bank holds the images its training triplets name). Everything here is keyed
by image id, the release by list position; with consistent lists the numbers agree, so there is no option.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._config import option
from ..checks import check_positive_int
from ..errors import ConfigError, explain
from ..positives.augmenter import AugmentConfig

__all__ = ["Recipe", "Generation", "RECIPE_DIR", "RELEASE_VALUES", "MODELS", "DATASETS", "list_recipes",
           "load_recipe", "default_recipe", "release_pool_images", "recipes_page", "POOLS", "POOL_IMAGES",
           "ANNOTATED_TEXTS", "CAPTIONER"]

RECIPE_DIR = Path(__file__).resolve().parent
MODELS = ("clip4cir", "tgcir", "blip4cir", "sprc", "zeroshot")
DATASETS = ("cirr", "fashioniq")
BANK_IMAGES = ("all", "triplets")
POOLS = ("triplets", "all")
ANNOTATED_TEXTS = ("release", "both_orders")
# the release's value of each deliberate difference (section, key) -> value
RELEASE_VALUES: dict[tuple[str, str], Any] = {("stage2", "mask_reference"): False, ("bank", "images"): "triplets"}
CAPTIONER = "hf:llava-hf/llava-1.5-7b-hf"  # the printed commands' captioner: the release captioned with LLaVA
# where `cir-plugins augment` takes its per-dataset defaults from
_DEFAULT_RECIPE = {"cirr": "clip4cir-cirr", "fashioniq": "clip4cir-fashioniq"}
_TOP = {"name", "model", "model_label", "dataset", "stage1", "start", "fusion", "generation", "bank", "stage2",
        "trains", "evaluation", "published", "notes", "sources"}
_GENERATION = {"annotated", "prompt", "words", "rank_window", "partners_per_image", "refer_only", "max_triplets",
               "templates", "pool", "annotated_texts"}
# what a recipe file may leave out; the other AugmentConfig fields are the run's (reproduce sets them), not the recipe's
_GENERATION_OPTIONAL = {"rewriter"}
_GENERATION_KEYS = _GENERATION | _GENERATION_OPTIONAL
_START = {"checkpoint", "convert", "model", "factory_kwargs", "trained", "args"}
# training images per pool in the official files (what an absolute rank window is a share of): "triplets" = the
# images the annotated train triplets name: FashionIQ 25,136, counted in cap.{dress,shirt,toptee}.train.json
# (github.com/XiaoxiaoGuo/fashion-iq, commit f71b16c); CIRR not counted, its 16,939 training images bound it.
# "all" = every training image once: FashionIQ's three categories list 46,609 names, 1,180 of them twice.
POOL_IMAGES = {("fashioniq", "triplets"): 25136, ("fashioniq", "all"): 45429,
               ("cirr", "triplets"): 16939, ("cirr", "all"): 16939}


def _fail(path: Path, what: str, got: Any, expected: Any = None, fix: str | None = None) -> ConfigError:
    return ConfigError(explain(f"recipe {path.name}: {what}", got=got, expected=expected, fix=fix or f"fix {path}"))


def _keys(path: Path, where: str, data: Any, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(data, dict):
        raise _fail(path, f"{where} must be a JSON object", type(data).__name__)
    missing, unknown = sorted(required - set(data)), sorted(set(data) - required - set(optional))
    if missing:
        raise _fail(path, f"{where} lacks keys", missing, expected=sorted(required))
    if unknown:
        raise _fail(path, f"{where} has unknown keys", unknown, expected=sorted(required | set(optional)))
    return data


def _bool(path: Path, where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"{where} must be true or false", value)
    return value


@dataclass
class Generation(AugmentConfig):
    """A recipe's generation settings: an :class:`~cir_plugins.positives.augmenter.AugmentConfig` for
    ``TripletAugmenter(..., config=recipe.generation)``, plus how the release made its inputs (module docstring)."""

    annotated: bool = option(True, "train on the annotated triplets too; False = zero-shot")
    prompt: str = option("Describe the image in {k} words.", "the captioner prompt, with {k} (and {category})")
    words: int = option(10, "k, the caption length the prompt asks for")
    pool: str = option("triplets", "the images ranked for partners: \"triplets\" (those the annotated train triplets "
                       "name, as the release's script) or \"all\" (every training image)")
    annotated_texts: str | None = option(None, "FashionIQ's training texts (ANNOTATED_TEXTS); None for CIRR")
    rewriter: str | None = option(None, "a text rewriter spec (\"hf:<model name or path>\"); None = templates")
    keep_equal_captions: bool = option(True, "keep pairs whose two captions are equal, as the release does")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prompt, str) or "{k}" not in self.prompt:
            raise ConfigError(explain("generation.prompt must be a string with {k}", got=self.prompt))
        if self.pool not in POOLS:
            raise ConfigError(explain("generation.pool is unknown", got=self.pool, expected=POOLS))
        if not isinstance(self.annotated, bool):
            raise ConfigError(explain("generation.annotated must be true or false", got=self.annotated))
        check_positive_int("generation.words", self.words)
        if self.rewriter is not None and (not isinstance(self.rewriter, str) or not self.rewriter.strip()):
            raise ConfigError(explain("generation.rewriter must be a rewriter spec such as "
                                      "'hf:Qwen/Qwen2.5-1.5B-Instruct' or null", got=self.rewriter))

    @property
    def window_or_any(self) -> Any:
        """The rank window, with (-1, -1) for "any image" (a recipe's null)."""
        return self.rank_window if self.rank_window is not None else (-1, -1)

    def window_fractions(self, dataset: str) -> tuple[float, float] | None:
        """The rank window as fractions of N (None = any image): the release's absolute ranks over the images it
        ranked (:func:`release_pool_images` of this pool), the same share of the ranking on data of any size."""
        if self.rank_window is None:
            return None
        a, b = self.rank_window
        if isinstance(a, float):
            return (float(a), float(b))
        n = release_pool_images(dataset, self.pool)
        return (round(a / n, 4), round(min(b / n, 1.0), 4))


@dataclass(frozen=True)
class Recipe:
    """One base model on one dataset: generation, bank, stage 2, evaluation and the published numbers."""

    name: str
    model: str
    model_label: str
    dataset: str
    stage1: str
    start: Mapping[str, Any]
    fusion: str
    generation: Generation
    bank: Mapping[str, Any]
    stage2: Mapping[str, Any]
    trains: str
    evaluation: Mapping[str, Any]
    published: Mapping[str, Any] | None
    notes: tuple[str, ...]
    sources: Mapping[str, str]
    stage1_training: Mapping[str, Any] | None = None
    path: Path | None = field(default=None, compare=False)

    def stage2_config(self, **overrides: Any):
        """A :class:`~cir_plugins.training.config.Stage2Config` of the recipe's settings, ``overrides`` on top."""
        from ..training.config import Stage2Config

        return Stage2Config(**{**self.stage2, **overrides})

    def stage1_config(self, **overrides: Any):
        """The zero-shot rows' in-batch stage 1 as a Stage1Config (ConfigError for recipes without one)."""
        from ..training.config import Stage1Config

        if self.stage1_training is None:
            raise ConfigError(explain(f"recipe {self.name} starts from a stage-1 checkpoint: it has no stage 1 to run",
                                      fix="pass the stage-1 checkpoint; only the zeroshot-* recipes train stage 1"))
        return Stage1Config(**{**self.stage1_training, **overrides})

    def as_release(self) -> Recipe:
        """This recipe with the release's value of every deliberate difference (:data:`RELEASE_VALUES`)."""
        sections = {"stage2": dict(self.stage2), "bank": dict(self.bank)}
        for (section, key), value in RELEASE_VALUES.items():
            sections[section][key] = value
        return Recipe(**{**self.__dict__, **sections})

    def commands(self) -> list[str]:
        """The command lines that reproduce this recipe on the full data set (``cir-plugins recipe list``): the
        checkpoint's conversion when needed, then the ``recipe run`` line built from ``start``. ``DATA/<dataset>``,
        ``YOUR_<MODEL>.py`` and the ``runs/`` folders are the user's to fill."""
        start = self.start
        words = ["cir-plugins", "recipe", "run", self.name, "--model", start["model"]]
        if start["factory_kwargs"]:
            words += ["--factory-kwargs", json.dumps(start["factory_kwargs"])]
        if start["trained"]:
            words += ["--trained", start["trained"]]
        words += [*start["args"], "--root", f"DATA/{self.dataset}", "--captioner", CAPTIONER, "--out",
                  f"runs/{self.name}"]
        return ([start["convert"]] if start["convert"] else []) + [" ".join(shlex.quote(w) for w in words)]

    def describe(self) -> str:
        """This recipe for a reader (Markdown): start, commands, what trains, temperature, annotated share and
        partner pool with their derivations, and the defaults that differ from the release (with the option)."""
        g, s2 = self.generation, self.stage2
        learned = (f"tau itself in the AdamW group (weight decay {s2['weight_decay']}), as the release"
                   if s2.get("temperature_param") == "tau" else "log tau")
        tau = (f"{s2['temperature']} fixed" if not s2["learn_temperature"]
               else f"{s2['temperature']} learned as {learned}")
        window = ("any image (the release's random partner)" if g.rank_window is None else
                  f"ranks [{g.rank_window[0]}, {g.rank_window[1]})"
                  + (f", as fractions of the release's pool {self.generation.window_fractions(self.dataset)} "
                     "(--rank-window fractions)" if self.dataset in DATASETS else ""))
        count = POOL_IMAGES.get((self.dataset, g.pool))
        pool = ("every training image" if g.pool == "all" else "the images the annotated train triplets name"
                + ("" if count is None else f" (at most {count:,}, CIRR's training images)" if self.dataset == "cirr"
                   else f" ({count:,} in the official files)"))
        lines = [f"## {self.name}: {self.model_label} on {self.dataset}", "",
                 f"- Starts from: {self.start['checkpoint']}.",
                 *[f"- {'Convert' if k == 0 and self.start['convert'] else 'Run'}: `{c}`"
                   for k, c in enumerate(self.commands())],
                 f"- Fusion: {self.fusion}. Stage 2 trains: {self.trains}.",
                 f"- Temperature: {tau}.",
                 f"- Annotated share: {s2['annotated_fraction']}; {self.sources['annotated_fraction']}.",
                 f"- Partner pool: {pool}; window {window}; "
                 f"{'one partner' if g.partners_per_image == 1 else f'{g.partners_per_image} partners'} per "
                 f"{'distinct annotated reference' if g.refer_only else 'image'}"
                 + (f", K = {g.max_triplets:,} kept" if g.max_triplets else "") + ".",
                 "- Where the defaults differ from the release (the option that restores its value): the "
                 "reference row masked out of the stage-2 softmax and a bank of every training image (--release); "
                 "bf16 mixed precision and a bf16 bank on CUDA (--precision release: fp16 autocast, GradScaler, "
                 "float32 bank); partners ranked by the model's own image tower, where the release used Unicom "
                 "ViT-L/14, not on PyPI (--pair-encoder open_clip:NAME or hf:NAME)."]
        lines += [f"- {note}" + ("" if note.endswith(".") else ".") for note in self.notes
                  if not note.startswith("annotated_fraction")]  # the share's derivation is above
        return "\n".join(lines) + "\n"

    def on_synthetic(self, rank_window: tuple[float, float]) -> Recipe:
        """This CIRR recipe as ``<model>-synthetic``, on the synthetic world (CIRR layout, a few thousand images):
        the rank window as fractions of N (the release's ranks exceed the world's size), no published numbers."""
        if self.dataset != "cirr":
            raise ConfigError(explain("the synthetic world has the CIRR layout and protocol: start from a CIRR "
                                      "recipe", got=self.name, fix=f"use {self.model}-cirr"))
        generation = dataclasses.replace(self.generation, rank_window=tuple(rank_window))
        return Recipe(**{**self.__dict__, "name": f"{self.model}-synthetic", "dataset": "synthetic",
                         "generation": generation, "published": None})

    def to_dict(self) -> dict[str, Any]:
        """The recipe as its JSON file holds it."""
        def plain(section):
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in section.items()}

        out = {"name": self.name, "model": self.model, "model_label": self.model_label, "dataset": self.dataset,
               "stage1": self.stage1, "start": copy.deepcopy(dict(self.start)), "fusion": self.fusion,
               "generation": {k: v for k, v in self.generation.to_dict().items() if k in _GENERATION_KEYS},
               "bank": dict(self.bank), "stage2": plain(self.stage2), "trains": self.trains,
               "evaluation": dict(self.evaluation),
               "published": copy.deepcopy(dict(self.published)) if self.published is not None else None,
               "notes": list(self.notes), "sources": dict(self.sources)}
        if self.stage1_training is not None:
            out["stage1_training"] = plain(self.stage1_training)
        return out


def _generation(path: Path, data: Any) -> Generation:
    g = _keys(path, "generation", data, _GENERATION, _GENERATION_OPTIONAL)
    try:
        generation = Generation(**g)
    except ConfigError as error:
        raise _fail(path, f"generation: {error}", g) from None
    if generation.rank_window is not None and generation.window.is_any:  # a file writes "any image" as null
        raise _fail(path, "generation.rank_window starts below 0, which means 'any image' (written null in a recipe); "
                          "a window needs 0 <= a < b: ints are ranks, floats fractions of the images ranked, e.g. "
                          "[0.2, 0.3]", g["rank_window"])
    return generation


def _start(path: Path, data: Any) -> dict:
    s = _keys(path, "start", data, _START)
    for key in ("checkpoint", "model", "convert", "trained"):
        nullable = key in ("convert", "trained")
        if not (nullable and s[key] is None) and (not isinstance(s[key], str) or not s[key].strip()):
            raise _fail(path, f"start.{key} must be a non-empty string" + (" or null" if nullable else ""), s[key])
    if s["model"].count(":") != 1:
        raise _fail(path, "start.model must be a factory spec 'file.py:function' or 'pkg.module:function'", s["model"])
    if s["factory_kwargs"] is not None and not isinstance(s["factory_kwargs"], dict):
        raise _fail(path, "start.factory_kwargs must be a JSON object or null", s["factory_kwargs"])
    if not isinstance(s["args"], list) or not all(isinstance(a, str) for a in s["args"]):
        raise _fail(path, "start.args must be a list of strings", s["args"])
    return copy.deepcopy(s)


def _numbers(path: Path, where: str, data: Any) -> dict[str, float]:
    if not isinstance(data, dict) or not data:
        raise _fail(path, f"{where} must be a non-empty object metric -> number", data)
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 100):
            raise _fail(path, f"{where}[{key!r}] must be a percentage", value)
    return dict(data)


def _published(path: Path, data: Any) -> dict | None:
    if data is None:
        return None
    p = _keys(path, "published", data, {"split", "before", "after"}, {"before_label"})
    before, after = _numbers(path, "published.before", p["before"]), _numbers(path, "published.after", p["after"])
    if set(before) != set(after):
        raise _fail(path, "published.before and published.after must name the same metrics",
                    (sorted(before), sorted(after)))
    return {**p, "before": before, "after": after}


def _parse(path: Path, data: Any) -> Recipe:
    from ..training.config import Stage1Config, Stage2Config

    r = _keys(path, "the recipe", data, _TOP, {"stage1_training"})
    if r["name"] != path.stem:
        raise _fail(path, "name must equal the file name", r["name"], expected=path.stem)
    if r["model"] not in MODELS:
        raise _fail(path, "unknown model", r["model"], expected=MODELS)
    if r["dataset"] not in DATASETS:
        raise _fail(path, "unknown dataset", r["dataset"], expected=DATASETS)
    generation = _generation(path, r["generation"])
    if ("{category}" in generation.prompt) != (r["dataset"] == "fashioniq"):
        raise _fail(path, "the FashionIQ prompt names {category}; the CIRR prompt does not", generation.prompt)
    if r["dataset"] == "fashioniq" and generation.annotated_texts not in ANNOTATED_TEXTS:
        raise _fail(path, "generation.annotated_texts must name FashionIQ's training texts", generation.annotated_texts,
                    expected=ANNOTATED_TEXTS)
    if r["dataset"] != "fashioniq" and generation.annotated_texts is not None:
        raise _fail(path, "generation.annotated_texts is for FashionIQ (a CIRR triplet has one text): write null",
                    generation.annotated_texts)
    bank = _keys(path, "bank", r["bank"], {"dedup", "images"})
    _bool(path, "bank.dedup", bank["dedup"])
    if bank["images"] not in BANK_IMAGES:
        raise _fail(path, "bank.images is unknown", bank["images"], expected=BANK_IMAGES)
    stage2, stage1 = r["stage2"], r.get("stage1_training")
    for where, values, cls in (("stage2", stage2, Stage2Config), ("stage1_training", stage1, Stage1Config)):
        if values is None:
            continue
        if not isinstance(values, dict):
            raise _fail(path, f"{where} must be a JSON object", type(values).__name__)
        try:
            cls.from_dict(values)  # the config's own validation (unknown fields, ranges)
        except ConfigError as error:
            raise _fail(path, f"{where} is not a valid {cls.__name__}: {error}", values) from None
    if generation.annotated is False and stage1 is None:
        raise _fail(path, "a recipe without annotated triplets (zero-shot) needs stage1_training", None)
    share = stage2.get("annotated_fraction")
    if share is None or (generation.annotated and not 0 < share < 1) or (not generation.annotated and share != 0):
        raise _fail(path, "stage2.annotated_fraction must hold the release's annotated share: in (0, 1) with "
                          "annotated triplets, 0 without", share)
    if "annotated_fraction" not in r["sources"]:
        raise _fail(path, "sources must say where stage2.annotated_fraction comes from (key 'annotated_fraction')",
                    sorted(r["sources"]))
    evaluation = _keys(path, "evaluation", r["evaluation"], {"protocol", "split", "remove_reference"})
    if evaluation["protocol"] != r["dataset"]:
        raise _fail(path, "evaluation.protocol must be the dataset's", evaluation["protocol"], expected=r["dataset"])
    _bool(path, "evaluation.remove_reference", evaluation["remove_reference"])
    if r["dataset"] == "cirr" and not evaluation["remove_reference"]:
        raise _fail(path, "the CIRR protocol always removes the reference", False)
    for key in ("model_label", "stage1", "trains", "fusion"):
        if not isinstance(r[key], str) or not r[key].strip():
            raise _fail(path, f"{key} must be a non-empty string", r[key])
    if not isinstance(r["notes"], list) or not all(isinstance(n, str) for n in r["notes"]):
        raise _fail(path, "notes must be a list of strings", r["notes"])
    if not isinstance(r["sources"], dict) or not all(isinstance(v, str) for v in r["sources"].values()):
        raise _fail(path, "sources must be an object of strings", r["sources"])
    return Recipe(name=r["name"], model=r["model"], model_label=r["model_label"], dataset=r["dataset"],
                  stage1=r["stage1"], start=_start(path, r["start"]), fusion=r["fusion"], generation=generation,
                  bank=dict(bank), stage2=dict(stage2), trains=r["trains"],
                  evaluation=dict(evaluation), published=_published(path, r["published"]), notes=tuple(r["notes"]),
                  sources=dict(r["sources"]), stage1_training=dict(stage1) if stage1 is not None else None, path=path)


def list_recipes(folder: str | Path | None = None) -> list[str]:
    """Names of the recipes in ``folder`` (default: the package's), sorted."""
    return sorted(p.stem for p in Path(folder or RECIPE_DIR).glob("*.json"))


def load_recipe(name: str, folder: str | Path | None = None) -> Recipe:
    """The recipe ``name`` (a name from :func:`list_recipes`, or a path to a JSON file), validated."""
    candidate = Path(name)
    if candidate.suffix == ".json" and candidate.is_file():
        path = candidate
    else:
        path = Path(folder or RECIPE_DIR) / f"{name}.json"
        if not path.is_file():
            raise ConfigError(explain("unknown recipe", got=name, expected=list_recipes(folder),
                                      fix="run `cir-plugins recipe list`, or pass a recipe JSON file"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(explain(f"recipe {path} is not valid JSON ({error.msg} at line {error.lineno})",
                                  fix="fix the file")) from None
    except (UnicodeDecodeError, RecursionError) as error:  # not UTF-8 text; lists or objects nested too deeply
        problem = "nested too deeply" if isinstance(error, RecursionError) else f"not UTF-8 text ({error.reason})"
        raise ConfigError(explain(f"recipe {path} is not a JSON recipe: {problem}", fix="fix the file")) from None
    return _parse(path, data)


def release_pool_images(dataset: str, pool: str = "triplets") -> int:
    """How many images the release ranked partners among in the official files, for ``pool`` "triplets" (the
    release's) or "all" (:data:`POOL_IMAGES`)."""
    if (dataset, pool) not in POOL_IMAGES:
        raise ConfigError(explain("no release image count for this dataset and pool", got=(dataset, pool),
                                  expected=sorted(POOL_IMAGES)))
    return POOL_IMAGES[(dataset, pool)]


def recipes_page(folder: str | Path | None = None) -> str:
    """Every recipe for a reader (:meth:`Recipe.describe`), one section each: the text of ``docs/recipes.md``."""
    head = ("# The paper's recipes\n\n"
            "One section per recipe (`cir-plugins recipe show NAME --markdown`; the settings themselves: "
            "`cir-plugins recipe show NAME`, the files `cir_plugins/recipes/*.json`). `cir-plugins recipe list` "
            "prints the same commands. This page is generated from the recipe files "
            "(`cir_plugins.recipes.recipes_page()`); a test keeps it equal to them.\n\n")
    return head + "\n".join(load_recipe(name, folder).describe() for name in list_recipes(folder))


def default_recipe(dataset: str) -> Recipe | None:
    """The recipe a dataset's defaults come from (CLIP4Cir's, the paper's main row); None for other datasets."""
    name = _DEFAULT_RECIPE.get(dataset)
    return load_recipe(name) if name is not None else None
