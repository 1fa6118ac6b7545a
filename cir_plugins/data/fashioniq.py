"""FashionIQ loader (one category, one split), plus the ``load_split`` dispatcher.

On-disk layout under ``root``::

    captions/cap.{dress,shirt,toptee}.{split}.json   list of {"candidate": name, "target": name,
                                                      "captions": [c0, c1]} (test: no "target")
    image_splits/split.{category}.{split}.json       list of names
    images/{name}.jpg  (or .png)

Query texts follow the evaluation protocol: each caption is stripped of the characters ".?, "
at both ends, and ``texts = ("c0 and c1", "c1 and c0")``; ``texts[0]`` is the evaluation text. With
``texts="release"`` a triplet carries the four texts the method's release trains on, one drawn uniformly per
step: ``("c0 and c1", "c1 and c0", "c0", "c1")`` (texts[0] is still the evaluation text).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import AnnotationError, ConfigError, explain
from ._annotations import RecordChecker, read_json, read_records, require_root
from .images import DEFAULT_MAX_PIXELS, ImageStore
from .split import Split
from .triplet import Triplet

__all__ = ["load_fashioniq", "load_split", "CATEGORIES", "fashioniq_text", "STRIP_CHARS", "TEXT_VARIANTS"]


CATEGORIES = ("dress", "shirt", "toptee")
STRIP_CHARS = ".?, "
#: the texts of an annotated triplet (module doc)
TEXT_VARIANTS = ("both_orders", "release")


def fashioniq_text(first: str, second: str) -> str:
    """The protocol's query text: ``"{c0} and {c1}"``, each stripped of ".?, " at both ends."""
    return f"{first.strip(STRIP_CHARS)} and {second.strip(STRIP_CHARS)}"


def _image_path(images_dir: Path, name: str) -> str:
    """``images/{name}.png`` if that file exists, else ``images/{name}.jpg`` (the usual case)."""
    if (images_dir / f"{name}.png").exists() and not (images_dir / f"{name}.jpg").exists():
        return f"images/{name}.png"
    return f"images/{name}.jpg"


def load_fashioniq(root: str | os.PathLike, category: str, split: str, *, transform: str | Callable | None = "clip",
                   size: int = 224, on_bad_record: str = "error",
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, check_paths: bool = True,
                   texts: str = "both_orders") -> Split:
    """Load one FashionIQ category split (ids only; images lazily through an ImageStore).

    Args:
        root: dataset root (holds ``captions/``, ``image_splits/``, ``images/``).
        category: "dress", "shirt" or "toptee".
        split: "train", "val", "test" (any name present on disk).
        transform, size, max_pixels, check_paths, on_bad_record: as :func:`load_cirr`.
        texts: "both_orders" (default) or "release" (see the module doc: the release's four training texts).

    Returns:
        Split with ``protocol="fashioniq"``, ``category``, triplets whose ``meta`` holds ``category`` and the raw
        ``captions`` (c0, c1); ``target`` is None for the test split.
    """
    if category not in CATEGORIES:
        raise ConfigError(explain("unknown FashionIQ category", got=category, expected=CATEGORIES))
    if texts not in TEXT_VARIANTS:
        raise ConfigError(explain("unknown FashionIQ text variants", got=texts, expected=TEXT_VARIANTS))
    root_path = Path(root)
    require_root(root_path, "FashionIQ", "captions/, image_splits/ and images/")
    available = sorted(p.name[len(f"cap.{category}."):-len(".json")]
                       for p in (root_path / "captions").glob(f"cap.{category}.*.json"))
    captions_path = root_path / "captions" / f"cap.{category}.{split}.json"
    splits_path = root_path / "image_splits" / f"split.{category}.{split}.json"
    names = read_json(splits_path, available=available)
    if not isinstance(names, list):
        raise AnnotationError(explain(f"{splits_path} must hold a JSON list of image names",
                                      got=type(names).__name__, fix="use the official image_splits file"))
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise AnnotationError(explain(f"{splits_path}, entry {position}: an image name must be a non-empty string",
                                          got=name, fix="fix the image_splits file"))
        if name in seen:
            raise AnnotationError(explain(f"{splits_path}, entry {position}: duplicate image name "
                                          f"(first at entry {seen[name]})", got=name, fix="list each image once"))
        seen[name] = position
    records = read_records(captions_path, available=available, fix="use the official captions file")
    checker = RecordChecker(captions_path, on_bad_record)
    triplets, info = checker.parse_all(
        records,
        lambda record, index, with_target: _parse_record(record, index, checker, seen, category, with_target, texts))
    images_dir = root_path / "images"
    paths = {name: _image_path(images_dir, name) for name in names}
    store = ImageStore(root_path, paths, transform, size=size, max_pixels=max_pixels, source=str(splits_path),
                       check_paths=check_paths)
    return Split(dataset="fashioniq", split=split, triplets=triplets, gallery_ids=list(names), images=store,
                 category=category, root=str(root_path), protocol="fashioniq", info=info)


_SAME_SPLIT = "check that the captions and image_splits files are of the same category and split"


def _parse_record(record: Any, index: int, checker: RecordChecker, gallery: dict[str, int], category: str,
                  with_target: bool | None, variants: str = "both_orders") -> Triplet:
    checker.require_fields(index, record, ("candidate", "captions"))
    candidate = record["candidate"]
    checker.check_image(index, "candidate", candidate, gallery, fix=_SAME_SPLIT)
    target, has_target = record.get("target"), "target" in record
    if has_target:
        checker.check_image(index, "target", target, gallery, fix=_SAME_SPLIT)
    checker.check_target_presence(index, "target", has_target, with_target)
    captions = record["captions"]
    if not isinstance(captions, list) or len(captions) != 2 or not all(isinstance(c, str) for c in captions):
        checker.fail(index, "captions", "must be a list of two strings", got=captions)
    for k, caption in enumerate(captions):
        if not caption.strip(STRIP_CHARS).strip():
            checker.fail(index, f"captions[{k}]", "is empty or only whitespace/punctuation", got=caption)
    c0, c1 = captions
    texts = (fashioniq_text(c0, c1), fashioniq_text(c1, c0))
    if variants == "release":
        texts += (c0.strip(STRIP_CHARS), c1.strip(STRIP_CHARS))
    return Triplet(reference=candidate, texts=texts, target=target if has_target else None, source="annotated",
                   pair_id=None, members=(), meta={"category": category, "captions": (c0, c1)})


def load_split(root: str | os.PathLike, dataset: str, split: str, category: str | None = None, **kwargs: Any) -> Split:
    """Dispatch: ``dataset`` "fashioniq" (needs ``category``), "cirr" or "synthetic" (CIRR layout)."""
    if dataset == "fashioniq":
        if category is None:
            raise ConfigError(explain("FashionIQ needs a category", got=None, expected=CATEGORIES,
                                      fix="pass category='dress' (or 'shirt', 'toptee')"))
        return load_fashioniq(root, category, split, **kwargs)
    if dataset in ("cirr", "synthetic"):
        if category is not None:
            raise ConfigError(explain(f"{dataset} has no categories", got=category, fix="leave category=None"))
        from .cirr import load_cirr

        return load_cirr(root, split, **kwargs)
    raise ConfigError(explain("unknown dataset", got=dataset, expected=("fashioniq", "cirr", "synthetic")))
