"""CIRR (rc2) loader, also used for the synthetic world (same layout).

On-disk layout under ``root``::

    cirr/captions/cap.rc2.{split}.json       list of {"pairid": int, "reference": name,
                                              "target_hard": name, "target_soft": {name: float},
                                              "caption": str, "img_set": {"id": int,
                                              "members": [names], "reference_rank": int,
                                              "target_rank": int}}
                                              (test1 records have no target fields)
    cirr/image_splits/split.rc2.{split}.json {name: "./train/34/name.png", ...} relative to root

Any split name present on disk loads ("train", "val", "test1", or the synthetic world's "test").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checks import check_positive_int
from ..errors import AnnotationError, explain
from ._annotations import RecordChecker, read_json, read_records, require_root
from .images import DEFAULT_MAX_PIXELS, ImageStore
from .split import Split
from .triplet import Triplet

__all__ = ["load_cirr", "cirr_splits", "CIRR_SET_SIZE"]


#: images in every CIRR img_set (the reference and five others); Recall_subset ranks the five
CIRR_SET_SIZE = 6


def cirr_splits(root: str | os.PathLike) -> list[str]:
    """Split names that have a captions file under ``root/cirr/captions``."""
    folder = Path(root) / "cirr" / "captions"
    return sorted(p.name[len("cap.rc2."):-5] for p in folder.glob("cap.rc2.*.json")) if folder.is_dir() else []


def load_cirr(root: str | os.PathLike, split: str, *, transform: str | Callable | None = "clip", size: int = 224,
              on_bad_record: str = "error", max_pixels: int | None = DEFAULT_MAX_PIXELS,
              set_size: int | None = CIRR_SET_SIZE, check_paths: bool = True) -> Split:
    """Load one CIRR split (ids only; images lazily through an ImageStore).

    Args:
        root: dataset root (holds ``cirr/`` and the image folders).
        split: split name as on disk ("train", "val", "test1"; "train"/"val"/"test" for the synthetic world).
        transform, size, max_pixels, check_paths: passed to :class:`ImageStore` (``check_paths=False``: each image
            path is checked when first used, so check-data can report a bad path per image).
        on_bad_record: "error" raises AnnotationError on the first bad record; "skip" drops bad records (logged,
            counted in ``split.info["skipped"]``). File-level problems (missing, malformed or truncated JSON, wrong
            top-level type, unsafe image paths) always raise.
        set_size: images in every ``img_set.members`` list, the reference included (CIRR: 6); a record with another
            count, or whose target is not a member, is a bad record (Rs@k over a wrong set is meaningless). None
            accepts any size (a CIRR-like dataset of your own).

    Returns:
        Split with one Triplet per caption record: ``texts = (caption,)``, ``target`` (None where the file has no
        targets), ``pair_id``, ``members`` (img_set.members) and ``meta`` with ``target_soft``, ``img_set_id``,
        ``reference_rank``, ``target_rank``, ``caption`` (raw).
    """
    root_path = Path(root)
    require_root(root_path, "CIRR", "cirr/captions and cirr/image_splits")
    check_positive_int("set_size", set_size, minimum=2, allow_none=True, fix=f"CIRR's is {CIRR_SET_SIZE}")
    available = cirr_splits(root_path)
    captions_path = root_path / "cirr" / "captions" / f"cap.rc2.{split}.json"
    splits_path = root_path / "cirr" / "image_splits" / f"split.rc2.{split}.json"
    image_paths = read_json(splits_path, available=available)
    if not isinstance(image_paths, dict):
        raise AnnotationError(explain(f"{splits_path} must hold a JSON object {{name: relative path}}",
                                      got=type(image_paths).__name__, fix="use the official split.rc2 file"))
    for name, rel in image_paths.items():
        if not isinstance(rel, str) or not rel.strip():
            raise AnnotationError(explain(f"{splits_path}, image {name!r}: the path must be a non-empty string",
                                          got=rel, fix="fix the image_splits file"))
        if not name.strip():
            raise AnnotationError(explain(f"{splits_path}: an image name is empty", got=name,
                                          fix="fix the image_splits file"))
    records = read_records(captions_path, available=available, fix="use the official cap.rc2 file")
    checker = RecordChecker(captions_path, on_bad_record)
    gallery = set(image_paths)
    seen_pairs: dict[int, int] = {}

    def parse(record: Any, index: int, with_target: bool | None) -> Triplet:
        triplet = _parse_record(record, index, checker, gallery, seen_pairs, with_target, set_size)
        seen_pairs[triplet.pair_id] = index
        return triplet

    triplets, info = checker.parse_all(records, parse)
    store = ImageStore(root_path, image_paths, transform, size=size, max_pixels=max_pixels, source=str(splits_path),
                       check_paths=check_paths)
    dataset = "synthetic" if (root_path / "synthetic" / "scenes.json").is_file() else "cirr"
    return Split(dataset=dataset, split=split, triplets=triplets, gallery_ids=list(image_paths), images=store,
                 category=None, root=str(root_path), protocol="cirr", info=info)


_SAME_SPLIT = "check that the captions and image_splits files are of the same split"


def _parse_record(record: Any, index: int, checker: RecordChecker, gallery: set[str], seen_pairs: dict[int, int],
                  with_target: bool | None, set_size: int | None = CIRR_SET_SIZE) -> Triplet:
    checker.require_fields(index, record, ("pairid", "reference", "caption", "img_set"))
    pair_id = record["pairid"]
    if not checker.is_int(pair_id):
        checker.fail(index, "pairid", "must be an int", got=pair_id)
    if pair_id in seen_pairs:
        checker.fail(index, "pairid", f"duplicate pair id (first at record {seen_pairs[pair_id]})", got=pair_id,
                     fix="pair ids must be unique; remove the duplicate")
    reference = record["reference"]
    checker.check_image(index, "reference", reference, gallery, fix=_SAME_SPLIT)
    caption = record["caption"]
    if not isinstance(caption, str):
        checker.fail(index, "caption", "must be a string", got=caption)
    if not caption.strip():
        checker.fail(index, "caption", "is empty or whitespace", got=caption)
    target, has_target = record.get("target_hard"), "target_hard" in record
    if has_target:
        checker.check_image(index, "target_hard", target, gallery, fix=_SAME_SPLIT)
    checker.check_target_presence(index, "target_hard", has_target, with_target)
    target_soft = record.get("target_soft", {})
    if not isinstance(target_soft, dict) or not all(checker.is_number(v) for v in target_soft.values()):
        checker.fail(index, "target_soft", "must be an object {name: number}", got=target_soft)
    img_set = record["img_set"]
    if not isinstance(img_set, dict):
        checker.fail(index, "img_set", "must be an object with 'members'", got=img_set)
    members = img_set.get("members")
    if not isinstance(members, list) or not members or not all(checker.is_name(m) for m in members):
        checker.fail(index, "img_set.members", "must be a non-empty list of image names", got=members)
    if len(set(members)) != len(members):
        checker.fail(index, "img_set.members", "lists an image twice", got=members)
    if missing := [m for m in members if m not in gallery]:
        checker.fail(index, "img_set.members", "names images not in the split's image list", got=missing)
    if reference not in members:
        checker.fail(index, "img_set.members", "does not contain the reference", got=members,
                     expected=f"a list including {reference!r}")
    if set_size is not None and len(members) != set_size:
        checker.fail(index, "img_set.members", f"must list exactly {set_size} images (the reference and "
                     f"{set_size - 1} others; Recall_subset ranks them)", got=len(members), expected=set_size,
                     fix="use the official cap.rc2 file, or fix or remove this record (on_bad_record='skip'); for a "
                         "dataset of your own with other sets pass set_size=None")
    if has_target and target not in members:
        checker.fail(index, "target_hard", "is not among img_set.members (Recall_subset could never find it)",
                     got=target, expected=f"one of {members}")
    meta: dict[str, Any] = {"target_soft": dict(target_soft), "caption": caption}
    for key in ("id", "reference_rank", "target_rank"):
        if key in img_set:
            if not checker.is_int(img_set[key]):
                checker.fail(index, f"img_set.{key}", "must be an int", got=img_set[key])
            meta["img_set_id" if key == "id" else key] = img_set[key]
    return Triplet(reference=reference, texts=(caption.strip(),), target=target if has_target else None,
                   source="annotated", pair_id=pair_id, members=tuple(members), meta=meta)
