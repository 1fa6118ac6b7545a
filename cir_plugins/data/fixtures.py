"""Builders of tiny, seeded FashionIQ and CIRR trees (tens of images) in the exact on-disk formats, for tests and
examples, with the real files' quirks that loaders must cope with: captions with leading spaces, trailing
punctuation and typos, ``.jpg`` and ``.png`` images of varied aspect ratio and mode, nested CIRR image paths,
``target_soft`` values of 1.0, 0.5 and -1.0, test splits without targets. Each builder returns the root as a Path.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from .._atomic import atomic_write_json
from .fashioniq import CATEGORIES

__all__ = ["build_fashioniq_tree", "build_cirr_tree", "write_image"]

_FIQ_CAPTIONS = [
    (" is red and shorter.", "has no sleeves"), ("is more colorfull", " has a v-neck?"),
    ("is darker, ", "is longer and has a belt."), ("  has stripes", "is solid blue"),
    ("is sleevless and white.", " more fitted,"), ("has a floral print?", "is less formal"),
]
_CIRR_CAPTIONS = [
    " Change the dog to a cat.", "remove the people and make the sky darker", "The same animal but on grass.",
    " show two of them instead of one", "Zoom out and add a tree", "make it black and white.",
]


def write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    """Write a random image of ``size`` (width, height) in ``mode`` at ``path`` (format from suffix)."""
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if mode == "RGB" else image.convert(mode)).save(path)


def _dump(path: Path, data) -> None:
    atomic_write_json(path, data, indent=1, make_parents=True)


def build_fashioniq_tree(root: str | os.PathLike, *, n_images: int = 8, n_triplets: int = 5,
                         categories=CATEGORIES, splits=("train", "val", "test"), seed: int = 0) -> Path:
    """A tiny FashionIQ tree: per category and split ``n_images`` images and ``n_triplets`` records.

    Image names are ``B0{category}_{split}{k:02d}`` (e.g. "B0dress_val03"); every third image is a ``.png`` (the rest
    ``.jpg``); sizes vary (e.g. 24x40, 40x24, 30x30); one image per split is grayscale and one RGBA (stored as PNG).
    Captions with leading spaces, trailing ".", "?", ",", typos. The ``test`` split has no "target" fields.
    """
    root = Path(root)
    rng = random.Random(seed)
    sizes = [(24, 40), (40, 24), (30, 30), (20, 44), (36, 28)]
    for category in categories:
        for split in splits:
            names = [f"B0{category}_{split}{k:02d}" for k in range(n_images)]
            _dump(root / "image_splits" / f"split.{category}.{split}.json", names)
            for k, name in enumerate(names):
                suffix = ".png" if k % 3 == 2 else ".jpg"
                mode = "L" if k == 0 else ("RGBA" if k == 2 else "RGB")
                write_image(root / "images" / f"{name}{suffix}", sizes[k % len(sizes)],
                            seed=rng.randrange(1 << 30), mode=mode)
            records = []
            for t in range(n_triplets):
                candidate, target = rng.sample(names, 2)
                record = {"candidate": candidate, "captions": _FIQ_CAPTIONS[(t + len(split)) % len(_FIQ_CAPTIONS)]}
                records.append(record if split == "test" else {"target": target, **record})
            _dump(root / "captions" / f"cap.{category}.{split}.json", records)
    return root


def build_cirr_tree(root: str | os.PathLike, *, n_images: int = 12, n_triplets: int = 4, seed: int = 0,
                    splits=("train", "val", "test1")) -> Path:
    """A tiny CIRR (rc2) tree: per split ``n_images`` images (>= 6) and ``n_triplets`` records.

    Image folders: train -> ``./train/{k % 3 + 30}/name.png`` (nested), val -> ``./dev/name.png``, test1 ->
    ``./test1/name.png``. Names look like "train-10108-0-img0". Captions with leading spaces and trailing full stops;
    ``target_soft`` with 1.0 / 0.5 / -1.0 values; 6-member img_sets that include reference and target; test1 records
    have no ``target_hard`` / ``target_soft`` / ``target_rank``.
    """
    if n_images < 6:
        raise ValueError("build_cirr_tree needs n_images >= 6 (one img_set)")
    root = Path(root)
    rng = random.Random(seed)
    folder = {"train": "train", "val": "dev", "test1": "test1"}
    pair_id = 100
    for split in splits:
        prefix = folder.get(split, split)
        names = [f"{prefix}-{1000 + k // 2}-{k % 2}-img{k % 2}" for k in range(n_images)]
        paths = {}
        for k, name in enumerate(names):
            paths[name] = rel = f"./{prefix}/{k % 3 + 30}/{name}.png" if split == "train" else f"./{prefix}/{name}.png"
            write_image(root / rel, (28 + 4 * (k % 3), 24), seed=rng.randrange(1 << 30))
        _dump(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", paths)
        records = []
        for t in range(n_triplets):
            members = rng.sample(names, 6)
            reference, target = members[0], members[1]
            rng.shuffle(members)
            record = {"pairid": pair_id, "reference": reference,
                      "caption": _CIRR_CAPTIONS[(t + pair_id) % len(_CIRR_CAPTIONS)],
                      "img_set": {"id": 500 + t, "members": members,
                                  "reference_rank": members.index(reference)}}
            if split != "test1":
                others = [m for m in members if m not in (reference, target)]
                record["target_hard"] = target
                record["target_soft"] = {target: 1.0, others[0]: 0.5, others[1]: -1.0}
                record["img_set"]["target_rank"] = members.index(target)
            records.append(record)
            pair_id += 1
        _dump(root / "cirr" / "captions" / f"cap.rc2.{split}.json", records)
    return root
