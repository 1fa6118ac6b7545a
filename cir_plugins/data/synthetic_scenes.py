"""The synthetic world's scenes: vocabulary, captions (describe / parse), pixels, and the model stand-ins.

A scene is a list of objects ``{"shape", "color", "size", "row", "col"}`` on a 3 x 3 grid. :func:`describe_scene`
writes its exact caption, :func:`parse_caption` reads one back, :func:`render_scene` draws it;
:class:`SyntheticCaptioner` and :class:`SyntheticRewriter` stand in for the method's models. The world itself is
:mod:`cir_plugins.data.synthetic`, which re-exports every public name of this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..checks import check_positive_int, check_probability
from ..errors import ConfigError, DataError, explain

__all__ = ["SHAPES", "COLORS", "COLOR_RGB", "SIZES", "ROWS", "COLS", "POSITIONS", "EDIT_TYPES", "BACKGROUND",
           "describe_scene", "parse_caption", "render_scene", "position_name", "load_scenes", "SyntheticCaptioner",
           "SyntheticRewriter"]

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
COLOR_RGB = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 215), "yellow": (235, 210, 45),
    "purple": (135, 55, 175), "orange": (240, 135, 30), "cyan": (40, 200, 210),
}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
#: position name of cell (row, col), row-major: "top left", "top", "top right", "left", "centre", ...
POSITIONS = tuple(
    ("centre" if (r, c) == (1, 1) else (ROWS[r] if c == 1 else (COLS[c] if r == 1 else f"{ROWS[r]} {COLS[c]}")))
    for r in range(3) for c in range(3)
)
EDIT_TYPES = ("recolour", "reshape", "resize", "move", "add", "remove")
BACKGROUND = (190, 190, 190)


def position_name(row: int, col: int) -> str:
    """Name of cell (row, col): "top left", "top", ..., "centre", ..., "bottom right"."""
    return POSITIONS[row * 3 + col]


def position_phrase(row: int, col: int) -> str:
    """Where a caption places cell (row, col): "in the centre", "on the left", "at the top right", ..."""
    name = position_name(row, col)
    return "in the centre" if name == "centre" else f"on the {name}" if name in ("left", "right") else f"at the {name}"


def _object_phrase(obj: Mapping[str, Any]) -> str:
    text = " ".join([obj[k] for k in ("size", "color") if obj.get(k)] + [obj.get("shape") or "shape"])
    phrase = f"{'an' if text[0] in 'aeiou' else 'a'} {text}"
    if obj.get("row") is not None and obj.get("col") is not None:
        phrase += " " + position_phrase(obj["row"], obj["col"])
    return phrase


def _reading_order(obj: Mapping[str, Any]) -> tuple[int, int]:
    return (obj["row"] if obj.get("row") is not None else 9, obj["col"] if obj.get("col") is not None else 9)


def describe_scene(objects: Sequence[Mapping[str, Any]], words: int | None = None) -> str:
    """The exact caption of a scene, objects in reading order (row, then column).

    Example: ``"a large red circle at the top left and a small blue square in the centre"``. Missing attributes
    (``None`` or absent keys, a noisy captioner's partial scene) are left out. With a word budget ``words``, a longer
    caption loses detail least salient first (every position, then every size, then every colour, then trailing
    objects) until it fits, as a captioner told "in {k} words" would.
    """
    if words is not None:
        caption = describe_scene(objects)
        if len(caption.split()) <= words:
            return caption
        kept = sorted((dict(obj) for obj in objects), key=_reading_order)  # stays in order once positions are gone
        for keys in (("row", "col"), ("size",), ("color",)):
            for obj in kept:
                for key in keys:
                    obj[key] = None
            caption = describe_scene(kept)
            if len(caption.split()) <= words:
                return caption
        while len(kept) > 1 and len(caption.split()) > words:
            kept.pop()
            caption = describe_scene(kept)
        return caption
    if not objects:
        return "an empty grey picture"
    parts = [_object_phrase(o) for o in sorted(objects, key=_reading_order)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def seed_of(*parts: Any) -> int:
    """A 64-bit seed from any values (sha256 of their text): the same parts, the same seed, in any process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":  # 10 corners, alternately r and 0.45 r from the centre, the first one up
        return [(cx + (r if k % 2 == 0 else r * 0.45) * np.cos(-np.pi / 2 + k * np.pi / 5),
                 cy + (r if k % 2 == 0 else r * 0.45) * np.sin(-np.pi / 2 + k * np.pi / 5)) for k in range(10)]
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    return None


def render_scene(objects: Sequence[Mapping[str, Any]], *, image_size: int = 40, seed: int = 0,
                 position_jitter: float = 0.12, color_jitter: int = 25, pixel_noise: float = 10.0) -> Image.Image:
    """Draw a scene as an RGB PIL image (image_size x image_size), jittered and noised by ``seed``."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3.0
    for obj in objects:
        cx = (obj["col"] + 0.5 + rng.uniform(-position_jitter, position_jitter)) * cell
        cy = (obj["row"] + 0.5 + rng.uniform(-position_jitter, position_jitter)) * cell
        r = cell * (0.46 if obj["size"] == "large" else 0.27)
        base = np.array(COLOR_RGB[obj["color"]])
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-color_jitter, color_jitter + 1, 3), 0, 255))
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        else:
            draw.polygon(_shape_points(obj["shape"], cx, cy, r), fill=fill)
    if pixel_noise > 0:
        array = np.asarray(image, dtype=np.float32)  # (H, W, 3)
        array = array + rng.normal(0.0, pixel_noise, array.shape).astype(np.float32)
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), "RGB")
    return image


def load_scenes(root: str | os.PathLike) -> dict[str, dict]:
    """``{image_id: {"objects": [...], "caption": str}}`` from ``{root}/synthetic/scenes.json``."""
    path = Path(root) / "synthetic" / "scenes.json"
    if not path.is_file():
        raise DataError(explain("no synthetic world here (scenes.json missing)", got=str(path),
                                fix="run make_world(root) or `cir-plugins world --root DIR`"))
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


class SyntheticCaptioner:
    """A captioner for the synthetic world (the captioner seam: ``(image_ids, images) -> captions``).

    Returns each image's exact scene caption from ``scenes.json``; with ``noise > 0`` every attribute (shape, colour,
    size, position) of every object is, with probability ``noise``, dropped or swapped for another value (half
    each), mimicking an imperfect MLLM. Deterministic per (seed, image id); ``images`` is ignored (the scene is
    known). ``words``: a captioning prompt's word budget ("describe the image in {k} words"), applied as
    :func:`describe_scene` does; None (the default) keeps the whole scene.
    """

    def __init__(self, root: str | os.PathLike, noise: float = 0.0, seed: int = 0, words: int | None = None) -> None:
        check_probability("noise", noise)
        check_positive_int("words", words, minimum=2, allow_none=True, fix="a word budget such as 8")
        self.root, self.noise, self.seed, self.words = Path(root), float(noise), int(seed), words
        self.scenes = load_scenes(root)
        self.name = f"synthetic-scene(noise={self.noise:g},seed={self.seed}" + (
            f",words={words})" if words is not None else ")")

    def caption_of(self, image_id: str) -> str:
        if image_id not in self.scenes:
            raise DataError(explain("image id is not in the synthetic world", got=image_id,
                                    fix="caption only ids of this world's splits"))
        scene = self.scenes[image_id]
        if self.noise == 0.0:
            return scene["caption"] if self.words is None else describe_scene(scene["objects"], words=self.words)
        rng = random.Random(seed_of("captioner", self.seed, image_id))
        noisy = []
        for obj in scene["objects"]:
            obj = dict(obj)
            for key, vocab in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", None)):
                if rng.random() >= self.noise:
                    continue
                drop = rng.random() < 0.5
                if key == "position":
                    if drop:
                        obj["row"] = obj["col"] = None
                    else:
                        cell = rng.choice([c for c in range(9) if c != obj["row"] * 3 + obj["col"]])
                        obj["row"], obj["col"] = cell // 3, cell % 3
                elif drop:
                    obj[key] = None
                else:
                    obj[key] = rng.choice([v for v in vocab if v != obj[key]])
            noisy.append(obj)
        return describe_scene(noisy, words=self.words)

    def __call__(self, image_ids: Sequence[str], images: Sequence[Any] | None = None) -> list[str]:
        if images is not None and len(images) != len(image_ids):
            raise ConfigError(explain("image_ids and images differ in length", got=(len(image_ids), len(images))))
        return [self.caption_of(i) for i in image_ids]


_OBJECT = re.compile(r"^an? (?:(?P<size>{sizes}) )?(?:(?P<color>{colors}) )?(?P<shape>{shapes}|shape)"
                     r"(?: (?:at|on|in) the (?P<where>{positions}))?$".format(
                         sizes="|".join(SIZES), colors="|".join(COLORS), shapes="|".join(SHAPES),
                         positions="|".join(sorted(POSITIONS, key=len, reverse=True))))


def parse_caption(caption: str) -> list[dict] | None:
    """The inverse of :func:`describe_scene`: ``{"shape", "color", "size", "row", "col"}`` per object, None for an
    attribute the caption does not state; None when any part is not an object phrase."""
    text = caption.strip()
    if text == "an empty grey picture":
        return []
    head, _, last = text.rpartition(" and ")
    objects = []
    for part in (head.split(", ") if head else []) + [last]:
        if (match := _OBJECT.match(part.strip())) is None:
            return None
        cell = POSITIONS.index(match["where"]) if match["where"] else None
        objects.append({"shape": None if match["shape"] == "shape" else match["shape"], "color": match["color"],
                        "size": match["size"], "row": None if cell is None else cell // 3,
                        "col": None if cell is None else cell % 3})
    return objects


class SyntheticRewriter:
    """Stands in for the method's optional LLM rewrite of generated texts (the ``rewrite`` hook, text -> text).

    Given a filled template that names both captions (``"{target} instead of {reference}"`` or ``"Unlike
    {reference}, I want {target}"``), it writes what an LLM asked for the style of human annotations would: a short
    relative edit ("make the circle blue and remove the small star"). It sees only the two (possibly noisy)
    captions, never the scenes; objects are matched by grid cell. Its phrasing is its own ("make X blue", "turn X
    into a star", "make X bigger", "replace X with a red star", "move X to the left", "remove X", "add a ...").

    The text comes back unchanged when it names only one caption (the ``"{target}"`` template), when a caption does
    not parse, when an object has no stated position, when the captions describe the same scene, or when they differ
    by more than ``max_edits`` changes. ``rewritten`` / ``kept`` count both outcomes.
    """

    _PAIR = (re.compile(r"^(?P<target>.+) instead of (?P<reference>.+)$"),
             re.compile(r"^Unlike (?P<reference>.+), I want (?P<target>.+)$"))

    def __init__(self, max_edits: int = 2) -> None:
        check_positive_int("max_edits", max_edits)
        self.max_edits = max_edits
        self.rewritten = self.kept = 0
        self.name = f"synthetic-rewrite(max_edits={max_edits})"

    @staticmethod
    def _name(obj: Mapping[str, Any], scene: Sequence[Mapping[str, Any]]) -> str:
        """The shortest description of ``obj`` that no other object of ``scene`` also fits."""
        for keys in (("shape",), ("color", "shape"), ("size", "color", "shape")):
            if any(obj.get(k) is None for k in keys):
                continue
            if sum(all(o.get(k) == obj[k] for k in keys) for o in scene) == 1:
                return "the " + " ".join(obj[k] for k in keys)
        words = " ".join(obj[k] for k in ("color", "shape") if obj.get(k)) or "shape"
        return f"the {words} {position_phrase(obj['row'], obj['col'])}"

    def edits(self, reference: Sequence[Mapping[str, Any]], target: Sequence[Mapping[str, Any]]) -> list[str] | None:
        """Edit phrases turning ``reference`` into ``target`` (objects matched by cell), or None if unknown."""
        if any(o.get("row") is None for o in list(reference) + list(target)):
            return None
        before = {o["row"] * 3 + o["col"]: o for o in reference}
        after = {o["row"] * 3 + o["col"]: o for o in target}
        phrases = []
        for cell in sorted(set(before) & set(after)):
            old, new = before[cell], after[cell]
            name = self._name(old, reference)
            changed = [k for k in ("shape", "color", "size") if old.get(k) != new.get(k) and new.get(k) is not None]
            if "shape" in changed and "color" in changed:
                phrases.append(f"replace {name} with {_object_phrase({'color': new['color'], 'shape': new['shape']})}")
                changed = [k for k in changed if k == "size"]
            phrases += [f"turn {name} into {_object_phrase({'shape': new['shape']})}" if key == "shape" else
                        f"make {name} {new['color']}" if key == "color" else
                        f"make {name} {'bigger' if new['size'] == 'large' else 'smaller'}" for key in changed]
        gone = [before[c] for c in sorted(set(before) - set(after))]
        came = [after[c] for c in sorted(set(after) - set(before))]
        for old in list(gone):  # the same object in another cell: a move
            same = [n for n in came if all(n.get(k) == old.get(k) for k in ("shape", "color", "size"))]
            if same:
                new = same[0]
                where = position_name(new["row"], new["col"])
                phrases.append(f"move {self._name(old, reference)} to the {where}")
                gone.remove(old)
                came.remove(new)
        return phrases + [f"remove {self._name(old, reference)}" for old in gone] + [
            f"add {_object_phrase(new)}" for new in came]

    def __call__(self, text: str) -> str:
        for pattern in self._PAIR:
            match = pattern.match(text.strip())
            if match is None:
                continue
            reference, target = parse_caption(match["reference"]), parse_caption(match["target"])
            phrases = None if reference is None or target is None else self.edits(reference, target)
            if phrases and len(phrases) <= self.max_edits:
                self.rewritten += 1
                return " and ".join(phrases)
            break
        self.kept += 1
        return text
