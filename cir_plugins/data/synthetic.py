"""The embedded synthetic CIR world: small rendered scenes, written in the CIRR on-disk layout.

Regenerate (or create) it with::

    cir-plugins world --root DIR [--seed 0] [--quick] [--image-size 40] [--config JSON]

or ``make_world(root, seed=0, size="default")``. Every loader and metric runs on it exactly as on CIRR:
``load_cirr(root, "train" | "val" | "test")`` reads it (the ``test`` split HAS targets, so it can be evaluated locally).

World statistics (defaults; the parameters are :class:`WorldConfig` fields):

- Objects: a scene holds 1-3 objects (``min_objects``/``max_objects``), each in its own cell of a 3 x 3 grid.
  Attributes: shape (6: circle, square, triangle, star, diamond, cross), colour
  (7: red, green, blue, yellow, purple, orange, cyan), size (2: small, large), position (9 cells: rows
  top/middle/bottom x columns left/centre/right). 84 object kinds per cell; no scene is drawn twice inside or
  across splits.
- Duplicates: like CIRR and FashionIQ, a few images (``duplicate_rate``, 3% of each split's) are pixel-identical
  copies of another image under another name, half of the same split, half of another split: ``syn-{split}-d{k:05d}``,
  an extra gallery image (never a query's reference or target) rendered with its source's seed. ``scenes.json``
  repeats the source's scene and ``world.json`` lists every copy (``stats.duplicates``: copy -> source). Inside a
  split a copy is a false negative unless duplicates are grouped (``cir_plugins.data.dedup.find_duplicates``). The
  copies have their own random stream: the rest of the world is the same as with ``duplicate_rate=0``.
- Rendering: PIL, ``image_size`` x ``image_size`` RGB (40 px) on a grey background; each object's centre is jittered
  by up to ``position_jitter`` of a cell, each colour channel by up to ``color_jitter`` levels, plus Gaussian pixel
  noise of std ``pixel_noise``, so the attributes are not trivially separable. Seeded per image id.
- Edit types (6): recolour, reshape, resize, move, add, remove. An annotated triplet applies one edit, or two with
  probability ``two_edit_rate`` (0.3).
- Phrasing: human-style, CIRR-like, describing the change rather than the target, relative and partial: 3-6
  templates per edit type ("make the circle blue", "change the red square into a triangle", "remove the small star",
  "move it to the left", ...), objects named by the shortest description that singles them out (sometimes "it",
  sometimes over-specified), two edits joined 4 ways, random capitalisation and full stops. Deliberately unlike the
  augmenter's templates ("{T} instead of {R}", "Unlike {R}, I want {T}", "{T}").
- Groups: each query has a CIRR-style ``img_set`` of 6 images: reference, target and 4 near variants (2 one edit
  away from the reference, 2 from the target), in a seeded random order; Recall_subset ranks the 5 members other
  than the reference. ``target_soft`` is ``{target: 1.0}``.
- Counts (``size="default"``): train 1000 annotated triplets (6000 group images) plus 6000
  unlabelled images (12000 train images); val 500 queries + 1000 distractors (4000 images);
  test 500 queries + 2000 distractors (5000 images). ``size="quick"``: train 120 + 300, val 40 + 60,
  test 40 + 60. Custom counts: a dict of WorldConfig fields or a WorldConfig.

Files under ``root``: ``cirr/captions/cap.rc2.{train,val,test}.json`` and ``cirr/image_splits/split.rc2.{split}.json``
exactly as CIRR rc2 (image paths ``./{split}/{bucket}/{name}.png``); ``synthetic/scenes.json``: ``{image_id:
{"objects": [{"shape", "color", "size", "row", "col"}], "caption": str}}``, the exact scene description (what an ideal
captioner would say); ``synthetic/world.json``: the completion marker (parameters + statistics), written last and
atomically (``synthetic/GENERATING`` exists while a generation runs, so a killed run is never taken for a world).

Scene vocabulary, captions, rendering and the captioner / rewriter stand-ins: :mod:`cir_plugins.data.synthetic_scenes`
(every name is re-exported here).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_json
from .._config import Config
from .._console import progress_bar
from ..checks import check_positive_int
from ..errors import ConfigError, explain
from .synthetic_scenes import (  # re-exported
    BACKGROUND,
    COLOR_RGB,
    COLORS,
    COLS,
    EDIT_TYPES,
    POSITIONS,
    ROWS,
    SHAPES,
    SIZES,
    SyntheticCaptioner,
    SyntheticRewriter,
    describe_scene,
    load_scenes,
    parse_caption,
    position_name,
    position_phrase,
    render_scene,
    seed_of,
)

__all__ = ["SHAPES", "COLORS", "COLOR_RGB", "SIZES", "ROWS", "COLS", "POSITIONS", "EDIT_TYPES", "WorldConfig",
           "make_world", "describe_scene", "parse_caption", "render_scene", "SyntheticCaptioner", "SyntheticRewriter",
           "load_scenes", "position_name", "BACKGROUND", "world_record"]

logger = logging.getLogger(__name__)

WORLD_FORMAT = 1


@dataclass
class WorldConfig(Config):
    """Parameters of a synthetic world (all of them go into the completion marker)."""

    n_train_triplets: int = 1000      # annotated train queries (each brings a 6-image group)
    n_train_unlabelled: int = 6000    # extra train images in no triplet (raw material for generation)
    n_val_queries: int = 500          # val queries (6-image groups)
    n_val_distractors: int = 1000     # extra random val gallery images
    n_test_queries: int = 500         # test queries (6-image groups), with targets
    n_test_distractors: int = 2000    # extra random test gallery images
    image_size: int = 40              # rendered side in pixels
    min_objects: int = 1              # fewest objects in a scene
    max_objects: int = 3              # most objects in a scene (<= 9)
    two_edit_rate: float = 0.3        # probability that a query applies two edits instead of one
    position_jitter: float = 0.12     # max object-centre shift, as a fraction of a grid cell
    color_jitter: int = 25            # max per-channel colour shift (0-255 levels)
    pixel_noise: float = 10.0         # std of the Gaussian pixel noise (0-255 levels)
    duplicate_rate: float = 0.03      # extra pixel-identical copies, as a fraction of each split's images

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                check_positive_int(f"WorldConfig.{f.name}", value, minimum=0)
            elif not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(explain(f"WorldConfig.{f.name} must be a non-negative number", got=value))
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ConfigError(explain("need 1 <= min_objects <= max_objects <= 9",
                                      got=(self.min_objects, self.max_objects), fix="e.g. 1 and 3"))
        if self.max_objects - self.min_objects < 1:
            raise ConfigError(explain("add/remove edits need max_objects > min_objects",
                                      got=(self.min_objects, self.max_objects), fix="e.g. min 1, max 3"))
        if self.image_size < 12:
            raise ConfigError(explain("image_size is too small to draw shapes", got=self.image_size,
                                      expected=">= 12", fix="e.g. 40"))
        if self.duplicate_rate > 0.5:
            raise ConfigError(explain("duplicate_rate must be in [0, 0.5]", got=self.duplicate_rate,
                                      fix="e.g. 0.03 (3% of each split's images are copies)"))
        if self.two_edit_rate > 1 or self.position_jitter > 0.5:
            raise ConfigError(explain("two_edit_rate must be in [0, 1] and position_jitter in [0, 0.5]",
                                      got=(self.two_edit_rate, self.position_jitter)))
        if self.n_train_triplets + self.n_val_queries + self.n_test_queries == 0:
            raise ConfigError(explain("a world needs at least one query", got=0, fix="set n_*_queries"))


PRESETS = {"default": {}, "quick": dict(n_train_triplets=120, n_train_unlabelled=300, n_val_queries=40,
                                        n_val_distractors=60, n_test_queries=40, n_test_distractors=60)}


def _config_of(size: str | Mapping[str, Any] | WorldConfig, image_size: int | None) -> WorldConfig:
    if isinstance(size, WorldConfig):
        config = size
    elif isinstance(size, str):
        if size not in PRESETS:
            raise ConfigError(explain("unknown world size", got=size, expected=tuple(PRESETS),
                                      fix="pass 'default', 'quick', a dict of counts or a WorldConfig"))
        config = WorldConfig(**PRESETS[size])
    elif isinstance(size, Mapping):
        config = WorldConfig.from_dict(size)
    else:
        raise ConfigError(explain("size must be a preset name, a dict or a WorldConfig", got=type(size).__name__))
    if image_size is not None:
        config = WorldConfig.from_dict({**config.to_dict(), "image_size": image_size})
    return config


def _signature(scene: Sequence[Mapping[str, Any]]) -> tuple:
    return tuple(sorted((o["row"], o["col"], o["shape"], o["color"], o["size"]) for o in scene))


def _random_object(rng: random.Random, row: int, col: int) -> dict:
    return {"shape": rng.choice(SHAPES), "color": rng.choice(COLORS), "size": rng.choice(SIZES),
            "row": row, "col": col}


def _random_scene(rng: random.Random, config: WorldConfig) -> list[dict]:
    """A scene: a list of object dicts, one object per cell."""
    cells = rng.sample(range(9), rng.randint(config.min_objects, config.max_objects))
    return [_random_object(rng, c // 3, c % 3) for c in cells]


def _free_cells(scene: Sequence[Mapping[str, Any]]) -> list[int]:
    used = {o["row"] * 3 + o["col"] for o in scene}
    return [c for c in range(9) if c not in used]


def _refer(scene: Sequence[Mapping[str, Any]], index: int, rng: random.Random, *, allow_it: bool = True) -> str:
    """How a person names object ``index``: the shortest description that singles it out."""
    obj = scene[index]
    if allow_it and len(scene) == 1 and rng.random() < 0.35:
        return "it"
    for keys in [("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")]:
        matches = [o for o in scene if all(o[k] == obj[k] for k in keys)]
        if len(matches) == 1:
            if keys == ("shape",) and rng.random() < 0.3:  # people often over-specify
                keys = ("color", "shape")
            return "the " + " ".join(obj[k] for k in keys)
    return f"the {obj['color']} {obj['shape']} {position_phrase(obj['row'], obj['col'])}"


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _edit(scene: list[dict], kind: str, rng: random.Random, config: WorldConfig) -> tuple[list[dict], str] | None:
    """Apply one edit of ``kind``; returns (new scene, human phrase) or None if not applicable."""
    new = [dict(o) for o in scene]
    if kind == "add":
        free = _free_cells(scene)
        if len(scene) >= config.max_objects or not free:
            return None
        cell = rng.choice(free)
        new.append(obj := _random_object(rng, cell // 3, cell % 3))
        where, kind = position_phrase(obj["row"], obj["col"]), f"{obj['color']} {obj['shape']}"
        return new, _pick(rng, [f"add a {kind} {where}", f"add a {obj['size']} {kind} {where}",
                                f"there should also be a {obj['size']} {kind} {where}", f"put a {kind} {where}",
                                f"include another object, a {kind} {where}"])
    if not scene:
        return None
    index = rng.randrange(len(scene))
    obj, ref = new[index], _refer(scene, index, rng)
    if kind == "remove":
        if len(scene) <= config.min_objects:
            return None
        del new[index]
        ref = _refer(scene, index, rng, allow_it=False)
        return new, _pick(rng, [f"remove {ref}", f"take away {ref}", f"get rid of {ref}", f"no {ref[4:]}",
                                f"delete {ref} and keep the rest"])
    if kind == "recolour":
        obj["color"] = color = rng.choice([c for c in COLORS if c != obj["color"]])
        return new, _pick(rng, [f"make {ref} {color}", f"change {ref} to {color}", f"{ref} should be {color}",
                                f"paint {ref} {color}", f"{color} instead of {scene[index]['color']}",
                                f"same but {ref} is {color}"])
    if kind == "reshape":
        obj["shape"] = shape = rng.choice([s for s in SHAPES if s != obj["shape"]])
        shape = ("an " if shape[0] in "aeiou" else "a ") + shape
        return new, _pick(rng, [f"change {ref} into {shape}", f"turn {ref} into {shape}",
                                f"replace {ref} with {shape}", f"make {ref} {shape}", f"{shape} instead"])
    if kind == "resize":
        bigger = obj["size"] == "small"
        obj["size"] = "large" if bigger else "small"
        if bigger:
            options = [f"make {ref} bigger", f"enlarge {ref}", f"{ref} should be larger", f"make {ref} large"]
        else:
            options = [f"make {ref} smaller", f"shrink {ref}", f"{ref} should be smaller", f"make {ref} small"]
        return new, _pick(rng, options)
    if kind == "move":
        free = _free_cells(scene)
        if not free:
            return None
        cell = rng.choice(free)
        row, col = cell // 3, cell % 3
        d_row, d_col = row - obj["row"], col - obj["col"]
        obj["row"], obj["col"] = row, col
        if d_row == 0 or d_col == 0:
            direction = ("left" if d_col < 0 else "right") if d_row == 0 else ("up" if d_row < 0 else "down")
            far = abs(d_row) + abs(d_col) == 2
            sideways = direction in ("left", "right")
            to = f"to the {direction}" if sideways else direction
            options = [f"move {ref} {to}", f"shift {ref} {'all the way ' if far else ''}{to}",
                       f"{ref} goes further {direction}" if sideways else f"move {ref} {to} a bit"]
        else:
            where, name = position_phrase(row, col), position_name(row, col)
            to = "to the centre" if name == "centre" else f"to the {name}"
            options = [f"move {ref} {to}", f"put {ref} {where}", f"{ref} should be {where}",
                       f"place {ref} {where} instead", f"{ref} goes {to} corner" if " " in name else f"move {ref} {to}"]
        return new, _pick(rng, options)
    raise ConfigError(explain("unknown edit type", got=kind, expected=EDIT_TYPES))


def _style(text: str, rng: random.Random) -> str:
    """Human noise: capitalised first letter sometimes, a full stop sometimes."""
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += "."
    return text


class _Builder:
    def __init__(self, config: WorldConfig, seed: int) -> None:
        self.config, self.seed = config, seed
        self.rng = random.Random(seed)
        self.used: set[tuple] = set()
        self.scenes: dict[str, dict] = {}
        self.edit_counts = {k: 0 for k in EDIT_TYPES}

    def fresh_scene(self) -> list[dict]:
        for _ in range(10_000):
            scene = _random_scene(self.rng, self.config)
            if _signature(scene) not in self.used:
                return scene
        raise ConfigError(explain("could not draw a new distinct scene: the world is too large for its "
                                  "attribute space", got=len(self.used), fix="reduce the counts or raise max_objects"))

    def add(self, name: str, scene: list[dict]) -> str:
        self.used.add(_signature(scene))
        self.scenes[name] = {"objects": [dict(o) for o in scene], "caption": describe_scene(scene)}
        return name

    def one_edit(self, scene: list[dict], avoid: set[tuple], kinds: Sequence[str] = EDIT_TYPES):
        for _ in range(200):
            result = _edit(scene, kind := self.rng.choice(kinds), self.rng, self.config)
            if result is not None and (sig := _signature(result[0])) not in self.used and sig not in avoid:
                return kind, result[0], result[1]
        return None

    def query(self, split: str, index: int) -> dict | None:
        """A reference, a target one or two edits away, and 4 near variants; None if stuck."""
        rng, reference = self.rng, self.fresh_scene()
        sig_ref = _signature(reference)
        scene, phrases, kinds = reference, [], []
        for _ in range(2 if rng.random() < self.config.two_edit_rate else 1):
            if (step := self.one_edit(scene, {sig_ref})) is None:
                return None
            kind, scene, phrase = step
            kinds.append(kind)
            phrases.append(phrase)
        target, sig_target = scene, _signature(scene)
        if len(phrases) == 2:
            phrases = [phrases[0] + _pick(rng, [" and ", ", then ", "; ", ". also "]) + phrases[1]]
        caption = _style(phrases[0], rng)
        variants, taken = [], {sig_ref, sig_target}
        for source in (reference, reference, target, target):
            if (step := self.one_edit(source, taken)) is None:
                return None
            variants.append(step[1])
            taken.add(_signature(step[1]))
        names = [f"syn-{split}-{index:05d}-img{k}" for k in range(6)]
        order = list(range(6))
        rng.shuffle(order)  # member k holds scene order[k]; scene 0 = reference, 1 = target
        for name, which in zip(names, order):
            self.add(name, ([reference, target] + variants)[which])
        for kind in kinds:
            self.edit_counts[kind] += 1
        ref_name, target_name = names[order.index(0)], names[order.index(1)]
        return {"pairid": None, "reference": ref_name, "target_hard": target_name,
                "target_soft": {target_name: 1.0}, "caption": caption,
                "img_set": {"id": None, "members": names, "reference_rank": order.index(0),
                            "target_rank": order.index(1)}}


def _marker_path(root: Path) -> Path:
    return root / "synthetic" / "world.json"


def world_record(root: str | os.PathLike) -> dict[str, Any] | None:
    """What :func:`make_world` recorded about the world under ``root`` (``{root}/synthetic/world.json``):
    ``{"params": ..., "stats": {"images": {split: n}, "queries": {split: n}, ...}, "path": the file}``; None
    when ``root`` holds no finished synthetic world (or the record is unreadable)."""
    marker = _marker_path(Path(root))
    if not marker.is_file() or (Path(root) / "synthetic" / "GENERATING").exists():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {**record, "path": str(marker)} if isinstance(record, dict) and "stats" in record else None


_OURS = ("cirr", "synthetic", "train", "val", "test")


def make_world(root: str | os.PathLike, *, seed: int = 0, size: str | Mapping[str, Any] | WorldConfig = "default",
               image_size: int | None = None, overwrite: bool = False, show_progress: bool = False,
               workers: int | None = None) -> Path:
    """Generate (or reuse) the synthetic world under ``root``; returns ``root`` as a Path.

    Args:
        root: directory to write into (created if needed).
        seed: the world's seed; the same seed and parameters give byte-identical files.
        size: "default", "quick", a dict of WorldConfig fields, or a WorldConfig.
        image_size: overrides ``WorldConfig.image_size`` when given (40 by default).
        overwrite: regenerate even when a complete world with these parameters exists.
        show_progress: a tqdm bar over the images being rendered.
        workers: processes that render images (default: the CPU count; worlds of at most 2000 images render
            in-process). The files do not depend on it.

    A complete world with the same parameters is reused (nothing is written). Otherwise the old world's files (only
    ``cirr/``, ``synthetic/``, ``train/``, ``val/``, ``test/``) are removed and a new one is written; a root holding
    other files that is not a world raises ConfigError unless ``overwrite=True``.
    """
    config = _config_of(size, image_size)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(explain("seed must be an int", got=seed))
    root = Path(root)
    params = {"format": WORLD_FORMAT, "seed": seed, **config.to_dict()}
    if not overwrite and (record := world_record(root)) is not None and record.get("params") == params:
        logger.info("synthetic world at %s is up to date (seed %d)", root, seed)
        return root
    root.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in root.iterdir()]
    if existing and not (root / "synthetic").is_dir() and not overwrite:
        raise ConfigError(explain("the root is not empty and holds no synthetic world", got=sorted(existing)[:10],
                                  fix="pick an empty directory or pass overwrite=True"))
    if foreign := [n for n in existing if n not in _OURS]:
        logger.info("leaving unrelated entries in %s untouched: %s", root, foreign[:10])
    (root / "synthetic").mkdir(exist_ok=True)
    generating = root / "synthetic" / "GENERATING"
    generating.write_text(json.dumps(params))
    _marker_path(root).unlink(missing_ok=True)
    for name in ("cirr", "train", "val", "test"):
        if (root / name).exists():
            shutil.rmtree(root / name)
    _generate(root, config, params, show_progress, workers)
    generating.unlink()
    return root


def _add_duplicates(builder: _Builder, image_lists: dict[str, list[str]], config: WorldConfig,
                    seed: int) -> dict[str, str]:
    """Append ``round(duplicate_rate * len(split))`` copies to each split's image list (module doc); returns copy
    name -> source name."""
    rng = random.Random(seed_of("duplicates", seed))
    originals = {split: list(names) for split, names in image_lists.items()}
    copies: dict[str, str] = {}
    for split, names in image_lists.items():
        others = [s for s in originals if s != split and originals[s]]
        for k in range(round(config.duplicate_rate * len(originals[split]))):
            pool = originals[rng.choice(others)] if others and rng.random() < 0.5 else originals[split]
            if pool:
                copies[name := f"syn-{split}-d{k:05d}"] = source = rng.choice(pool)
                names.append(name)
                builder.scenes[name] = {"objects": [dict(o) for o in builder.scenes[source]["objects"]],
                                        "caption": builder.scenes[source]["caption"]}
    return copies


def _render_chunk(task: tuple[list[tuple[str, list[dict], int]], dict]) -> int:
    """Render and save one chunk of (path, objects, seed) jobs; returns how many were written."""
    jobs, style = task
    for path, objects, image_seed in jobs:
        render_scene(objects, seed=image_seed, **style).save(path, format="PNG", compress_level=1)
    return len(jobs)


def _generate(root: Path, config: WorldConfig, params: dict, show_progress: bool, workers: int | None) -> None:
    seed = params["seed"]
    builder = _Builder(config, seed)
    plan = [("train", config.n_train_triplets, config.n_train_unlabelled),
            ("val", config.n_val_queries, config.n_val_distractors),
            ("test", config.n_test_queries, config.n_test_distractors)]
    annotations: dict[str, list[dict]] = {}
    image_lists: dict[str, list[str]] = {}
    n_records = 0  # pair ids and img_set ids count the queries of all splits
    for split, n_queries, n_extra in plan:
        records, names = [], []
        index = 0
        while len(records) < n_queries:
            record = builder.query(split, index)
            index += 1
            if record is None:
                continue
            record["pairid"] = record["img_set"]["id"] = n_records
            n_records += 1
            records.append(record)
            names.extend(record["img_set"]["members"])
        prefix = "u" if split == "train" else "x"
        for k in range(n_extra):
            names.append(builder.add(f"syn-{split}-{prefix}{k:05d}", builder.fresh_scene()))
        annotations[split], image_lists[split] = records, names
    duplicates = _add_duplicates(builder, image_lists, config, seed)
    # render every image (seeded per id, so order and worker count do not change a byte)
    total = sum(len(v) for v in image_lists.values())
    paths: dict[str, dict[str, str]] = {split: {} for split in image_lists}
    jobs: list[tuple[str, list[dict], int]] = []
    for split, names in image_lists.items():
        for k, name in enumerate(names):
            paths[split][name] = rel = f"./{split}/{k // 1000}/{name}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            # a copy is rendered with its source's seed: the same pixels under another name
            jobs.append((str(root / rel), builder.scenes[name]["objects"], seed_of(seed, duplicates.get(name, name))))
    style = dict(image_size=config.image_size, position_jitter=config.position_jitter,
                 color_jitter=config.color_jitter, pixel_noise=config.pixel_noise)
    chunks = [(jobs[i:i + 500], style) for i in range(0, len(jobs), 500)]
    n_workers = min(workers if workers is not None else (os.cpu_count() or 1), len(chunks))
    bar = progress_bar(total=total, desc="render synthetic world", show_progress=show_progress)
    if n_workers > 1 and total > 2000:
        with multiprocessing.get_context("spawn").Pool(n_workers) as pool:
            for done in pool.imap_unordered(_render_chunk, chunks):
                bar.update(done)
    else:
        for chunk in chunks:
            bar.update(_render_chunk(chunk))
    bar.close()
    for split in annotations:
        atomic_write_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", annotations[split], make_parents=True)
        atomic_write_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", paths[split], make_parents=True)
    atomic_write_json(root / "synthetic" / "scenes.json", builder.scenes)
    stats = {"images": {s: len(v) for s, v in image_lists.items()},
             "queries": {s: len(v) for s, v in annotations.items()}, "edit_counts": builder.edit_counts,
             "duplicates": duplicates,
             "objects_per_image": {str(n): sum(1 for s in builder.scenes.values() if len(s["objects"]) == n)
                                   for n in range(config.min_objects, config.max_objects + 1)}}
    atomic_write_json(_marker_path(root), {"params": params, "stats": stats})
    logger.info("synthetic world written to %s: %d images, %d queries", root, sum(stats["images"].values()),
                sum(stats["queries"].values()))
