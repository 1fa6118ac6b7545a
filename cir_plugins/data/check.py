"""Check a CIRR or FashionIQ download before training on it: :func:`check_dataset`.

The annotation and split files are read with the package's own loaders (bad records counted, not raised), then
every image they name is checked once: its path stays under the root and resolves (a bad path is that image's
problem, the rest of its split is still checked); it is a regular, non-empty file; its size passes the
decompression-bomb limit, itself and inside the ``transform`` (as training and build-bank would refuse it); it opens
(by default the header only, plus for PNG and JPEG the end-of-file marker ``IEND`` / ``FFD9``, which catches the
usual cut-off download; ``decode=True`` decodes every image through :meth:`ImageStore.load_pil`, as training does);
it is not a copy of another name (files of equal size hashed, blake2b of the bytes; with ``decode=True`` the pixels,
:func:`cir_plugins.data.dedup.pixel_hash`; two names resolving to one file count too).

Counts per split (images in the split file, records in the captions file) are compared with
:data:`OFFICIAL_COUNTS`; for the synthetic world (``dataset="synthetic"``, or a ``"cirr"`` root holding
``synthetic/world.json``) the splits are train, val and test and the counts those the world recorded. The library
never prints; ``cir-plugins check-data`` prints :meth:`DataCheckReport.format` and exits non-zero unless
:attr:`DataCheckReport.ok`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .._atomic import atomic_write_json
from .._console import progress_bar
from .._utils import file_sha256
from ..errors import AnnotationError, ConfigError, DataError, ImageLoadError, UnsafePathError, explain
from .dedup import pixel_hash
from .fashioniq import CATEGORIES, load_split
from .images import DEFAULT_MAX_PIXELS, OwnPixelLimit, make_transform, open_image_file
from .synthetic import world_record

__all__ = ["check_dataset", "DataCheckReport", "OFFICIAL_COUNTS", "DEFAULT_SPLITS", "COUNTS_SOURCE"]

logger = logging.getLogger(__name__)

#: The split names each dataset ships with.
DEFAULT_SPLITS = {"cirr": ("train", "val", "test1"), "fashioniq": ("train", "val", "test"),
                  "synthetic": ("train", "val", "test")}

#: Where :data:`OFFICIAL_COUNTS` come from.
COUNTS_SOURCE = {
    "cirr": "CIRR rc2 files (github.com/Cuberick-Orion/CIRR, branch cirr_dataset, commit 2276fba): image_splits "
            "split.rc2.{train,val,test1}.json and captions cap.rc2.{val,test1}.json counted; the train pair count "
            "28,225 is Table 2 of the CIRR paper (Liu et al., ICCV 2021, arXiv 2108.04024), whose README corrects the "
            "val count to 4,181",
    "fashioniq": "FashionIQ files (github.com/XiaoxiaoGuo/fashion-iq, commit f71b16c): image_splits "
                 "split.{cat}.{split}.json and captions cap.{cat}.{split}.json counted",
    "synthetic": "the counts the synthetic world recorded when it was made (synthetic/world.json under the root)",
}

#: Official counts per split: "images" = names in the split file, "triplets" = records in the captions file.
#: Keys: the split for CIRR, "category/split" for FashionIQ.
OFFICIAL_COUNTS: dict[str, dict[str, dict[str, int]]] = {
    "cirr": {"train": {"images": 16939, "triplets": 28225}, "val": {"images": 2297, "triplets": 4181},
             "test1": {"images": 2315, "triplets": 4148}},
    "fashioniq": {
        "dress/train": {"images": 11452, "triplets": 5985}, "dress/val": {"images": 3817, "triplets": 2017},
        "dress/test": {"images": 3818, "triplets": 2024},
        "shirt/train": {"images": 19036, "triplets": 5988}, "shirt/val": {"images": 6346, "triplets": 2038},
        "shirt/test": {"images": 6346, "triplets": 2038},
        "toptee/train": {"images": 16121, "triplets": 6027}, "toptee/val": {"images": 5373, "triplets": 1961},
        "toptee/test": {"images": 5374, "triplets": 2056},
    },
}

_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_TAIL_BYTES = 1024
_SHOWN = 10  # names listed per problem in the text report (the JSON lists every one)
# what can be wrong with one image: its path (leaves the root, cannot be resolved), its file, its size
_KINDS = ("bad_path", "missing", "empty", "truncated", "corrupt", "too_large")


@dataclass
class _Image:
    """One image file named by the annotation files (several names may share one file)."""

    path: Path | None  # None: the path in the split file does not resolve under the root
    names: list[str] = field(default_factory=list)
    store: Any = None  # an ImageStore that knows one of the names (full decode goes through it)
    status: str = "ok"  # "ok" or one of _KINDS
    error: str | None = None
    digest: str | None = None


@dataclass
class DataCheckReport:
    """What :func:`check_dataset` found; ``ok`` is False when anything makes the tree incomplete.

    ``mode``: "header" or "decode". ``splits``: one dict per split (CIRR) or category/split (FashionIQ): ``name``,
    ``images``, ``triplets`` (records in the file), ``official`` (counts or None), ``counts_match``, ``error`` (a
    file-level problem that stopped the split from loading), ``skipped_records``, ``bad_images``,
    ``broken_triplets``, ``broken_gallery``, ``ambiguous_targets``. ``images``: ``checked`` (files), one list of
    ``{"names", "path", "error"}`` per kind in ``bad_path`` / ``missing`` / ``empty`` / ``truncated`` / ``corrupt``
    / ``too_large`` (``path`` None for a bad path), ``duplicates`` (``{"names", "paths", "kind"}``). ``problems``:
    one sentence per problem that makes the tree incomplete; ``warnings``: those that do not (duplicates);
    ``advice``: what to do, one per kind of problem; ``seconds``: wall time.
    """

    dataset: str
    root: str
    mode: str
    splits: list[dict] = field(default_factory=list)
    images: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    counts_source: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every file loads, every image opens, no record was dropped and the counts match."""
        return not self.problems

    def to_dict(self) -> dict:
        """A JSON-ready dict (what ``--report FILE`` writes)."""
        return {"dataset": self.dataset, "root": self.root, "mode": self.mode, "ok": self.ok,
                "problems": list(self.problems), "warnings": list(self.warnings), "advice": list(self.advice),
                "splits": self.splits, "images": self.images, "counts_source": self.counts_source,
                "seconds": round(self.seconds, 3)}

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (folders created)."""
        return atomic_write_json(Path(path), self.to_dict(), indent=1, make_parents=True)

    def format(self) -> str:
        """The short human report: per-split counts, problems (a few names each), warnings, advice."""
        lines = [f"check-data {self.dataset} at {self.root} ({self.mode} check, {self.images.get('checked', 0)} "
                 f"image files, {self.seconds:.1f} s): {'COMPLETE' if self.ok else 'INCOMPLETE'}"]
        for unit in self.splits:
            if unit["error"]:
                lines.append(f"  {unit['name']}: not loaded: {unit['error']}")
                continue
            official = unit["official"]
            expected = (f" (official {official['images']} / {official['triplets']})" if official else "")
            lines.append(f"  {unit['name']}: {unit['images']} images / {unit['triplets']} triplets{expected}; "
                         f"{len(unit['bad_images'])} bad images, {len(unit['broken_triplets'])} broken triplets, "
                         f"{len(unit['broken_gallery'])} broken gallery entries")
        for kind in _KINDS:
            if entries := self.images.get(kind, []):
                shown = ", ".join(", ".join(e["names"]) for e in entries[:_SHOWN])
                more = f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
                cause = f" (first: {entries[0]['error']})" if kind in ("bad_path", "too_large") else ""
                lines.append(f"  {kind.replace('_', ' ')} ({len(entries)}): {shown}{more}{cause}")
        if duplicates := self.images.get("duplicates", []):
            shown = "; ".join(" = ".join(group["names"]) for group in duplicates[:_SHOWN])
            more = f" and {len(duplicates) - _SHOWN} more groups" if len(duplicates) > _SHOWN else ""
            lines.append(f"  duplicates ({len(duplicates)} groups): {shown}{more}")
        lines += [f"problem: {p}" for p in self.problems] + [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines + [f"to do: {a}" for a in self.advice])


def _units(dataset: str, splits: Iterable[str] | None,
           categories: Iterable[str] | None) -> list[tuple[str, str | None, str]]:
    """(unit name, category, split) for every split (and FashionIQ category) to check."""
    if dataset not in DEFAULT_SPLITS:
        raise ConfigError(explain("check-data knows CIRR and FashionIQ (and the synthetic world) only", got=dataset,
                                  expected=tuple(DEFAULT_SPLITS),
                                  fix="pass dataset='cirr', 'fashioniq' or 'synthetic'"))
    names = tuple(splits) if splits is not None else DEFAULT_SPLITS[dataset]
    if not names or not all(isinstance(s, str) and s for s in names):
        raise ConfigError(explain("splits must be a non-empty list of split names", got=names,
                                  expected=DEFAULT_SPLITS[dataset]))
    if dataset in ("cirr", "synthetic"):
        if categories is not None:
            raise ConfigError(explain("CIRR has no categories", got=categories, fix="leave categories unset"))
        return [(split, None, split) for split in names]
    cats = tuple(categories) if categories is not None else CATEGORIES
    if (unknown := [c for c in cats if c not in CATEGORIES]) or not cats:
        raise ConfigError(explain("unknown FashionIQ categories", got=unknown or cats, expected=CATEGORIES))
    return [(f"{cat}/{split}", cat, split) for cat in cats for split in names]


def _official(dataset: str, counts: Any, root: Path) -> Mapping[str, Mapping[str, int]] | None:
    if counts is None:
        return None
    if isinstance(counts, str):
        if counts != "official":
            raise ConfigError(explain("counts must be 'official', None or a mapping", got=counts,
                                      fix="pass counts=None to skip the comparison (a subset of a dataset)"))
        if dataset == "synthetic":
            if (record := world_record(root)) is None:
                raise DataError(explain("no synthetic world under this root", got=str(root),
                                        fix="make one with cir-plugins world --root ROOT, or pass counts=None"))
            stats = record["stats"]
            return {split: {"images": n, "triplets": stats.get("queries", {}).get(split)}
                    for split, n in stats.get("images", {}).items()}
        return OFFICIAL_COUNTS[dataset]
    if isinstance(counts, Mapping):
        return counts
    raise ConfigError(explain("counts must be 'official', None or a mapping unit -> {'images', 'triplets'}",
                              got=type(counts).__name__))


class _Bad(Exception):
    """One image's problem: ``args`` = (status, error)."""


def _inspect(entry: _Image, max_pixels: int | None, decode: bool) -> None:
    """Check one file (:func:`_header`, then its end marker, or with ``decode`` a full decode through the split's
    ImageStore and a pixel hash for duplicates): sets ``entry.status`` / ``entry.error`` / ``entry.digest``."""
    try:
        kind, size = _header(entry, max_pixels)
        if decode:
            try:
                entry.digest = pixel_hash(entry.store.load_pil(entry.names[0]))
            except ImageLoadError as error:
                raise _Bad("corrupt", str(error)) from None
        elif (marker := {"PNG": _PNG_END, "JPEG": _JPEG_END}.get(kind)) is not None:
            with open_image_file(entry.path, what=f"image {entry.names[0]!r}") as handle:
                handle.seek(max(0, size - _TAIL_BYTES))
                if marker not in handle.read():
                    raise _Bad("truncated", f"{kind} file without its end marker ({size} bytes): cut off")
    except _Bad as bad:
        entry.status, entry.error = bad.args


def _header(entry: _Image, max_pixels: int | None) -> tuple[str, int]:
    """(format, bytes) of one file from its header (the loaders' checked open); _Bad when it is missing, not a
    regular file, empty, unreadable, or too large (as :meth:`ImageStore.load_pil` refuses)."""
    path = entry.path
    try:
        info = path.stat()
    except FileNotFoundError:
        raise _Bad("missing", "no such file") from None
    except OSError as error:
        raise _Bad("corrupt", f"{type(error).__name__}: {error.strerror or error}") from None
    if not path.is_file():
        raise _Bad("corrupt", "not a regular file")
    if info.st_size == 0:
        raise _Bad("empty", "zero-byte file")
    what = f"image {entry.names[0]!r}"
    try:
        with open_image_file(path, what=what) as handle, OwnPixelLimit(), Image.open(handle) as image:
            (width, height), kind = image.size, image.format
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad files
        raise _Bad("corrupt", f"{type(error).__name__}: {error}") from None
    if max_pixels is not None and width * height > max_pixels:
        raise _Bad("too_large", f"{width}x{height} pixels exceed the limit {max_pixels}")
    if callable(check_size := getattr(entry.store.transform, "check_size", None)):  # a named transform's bound
        try:
            check_size(width, height, what=what)
        except ImageLoadError as error:
            raise _Bad("too_large", str(error)) from None
    return kind, info.st_size


def _duplicate_groups(entries: list[_Image], decode: bool) -> list[dict]:
    """Groups of names that hold the same image: one file under two names, equal bytes, or equal pixels."""
    groups = [{"names": sorted(e.names), "paths": [str(e.path)], "kind": "same file"}
              for e in entries if len(e.names) > 1]
    readable = [e for e in entries if e.status == "ok"]
    if not decode:  # hash only files that share their size with another file
        by_size: dict[int, list[_Image]] = defaultdict(list)
        for entry in readable:
            by_size[entry.path.stat().st_size].append(entry)
        for same_size in by_size.values():
            if len(same_size) > 1:
                for entry in same_size:
                    entry.digest = file_sha256(entry.path)
    by_digest: dict[str, list[_Image]] = defaultdict(list)
    for entry in readable:
        if entry.digest is not None:
            by_digest[entry.digest].append(entry)
    for same in by_digest.values():
        if len(same) > 1:
            groups.append({"names": sorted(n for e in same for n in e.names),
                           "paths": sorted(str(e.path) for e in same),
                           "kind": "equal pixels" if decode else "equal bytes"})
    return sorted(groups, key=lambda g: g["names"])


def check_dataset(root: str | os.PathLike, dataset: str, *, decode: bool = False, splits: Iterable[str] | None = None,
                  categories: Iterable[str] | None = None, counts: Any = "official",
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, transform: str = "clip", image_size: int = 224,
                  show_progress: bool = False) -> DataCheckReport:
    """Check a dataset tree (module doc): annotation files, every image they name, duplicates and official counts.

    Args:
        root: the dataset root (CIRR: holds ``cirr/``; FashionIQ: ``captions/``, ``image_splits/``, ``images/``).
        dataset: "cirr" (also the synthetic world's layout), "fashioniq" or "synthetic".
        decode: False (default) reads headers and end markers only; True decodes every image.
        splits: split names to check (default: all the dataset ships, :data:`DEFAULT_SPLITS`).
        categories: FashionIQ categories (default all three).
        counts: "official" compares with :data:`OFFICIAL_COUNTS`; None skips the comparison; or a mapping unit name
            (split, or "category/split") -> {"images": n, "triplets": m}.
        max_pixels: decompression-bomb limit (as :class:`ImageStore`).
        transform, image_size: the preprocessing training or build-bank will use (a name in TRANSFORM_NAMES): an
            image that would grow past ``max_pixels`` inside it is reported as too large.
        show_progress: a labelled tqdm bar over the image files.

    Returns:
        DataCheckReport (``.ok``, ``.format()``, ``.to_dict()``, ``.write_json(path)``).
    """
    start = time.perf_counter()
    make_transform(transform, image_size)  # a bad name or size: ConfigError before anything is read
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(explain("the dataset root is not a directory", got=str(root),
                                fix="pass the folder that holds the annotation files and images"))
    if dataset == "cirr" and world_record(root_path) is not None:
        logger.info("%s holds the synthetic world (synthetic/world.json): checking it as dataset 'synthetic' (its "
                    "splits train, val, test and the counts it recorded)", root_path)
        dataset = "synthetic"
    units = _units(dataset, splits, categories)
    official = _official(dataset, counts, root_path)
    report = DataCheckReport(dataset=dataset, root=str(root_path.resolve()), mode="decode" if decode else "header",
                             counts_source=COUNTS_SOURCE[dataset] if isinstance(counts, str) else None)
    files: dict[Path, _Image] = {}
    bad_paths: dict[str, _Image] = {}  # image id -> its entry, for paths that leave the root or do not resolve
    loaded: list[tuple[dict, Any]] = []
    for name, category, split in units:
        unit: dict[str, Any] = {"name": name, "images": None, "triplets": None,
                                "official": dict(official[name]) if official and name in official else None,
                                "counts_match": None, "error": None, "skipped_records": [], "bad_images": [],
                                "broken_triplets": [], "broken_gallery": [], "ambiguous_targets": []}
        report.splits.append(unit)
        try:
            data = load_split(root_path, dataset, split, category, transform=transform, size=image_size,
                              on_bad_record="skip", max_pixels=max_pixels, check_paths=False)
        except (AnnotationError, UnsafePathError) as error:
            unit["error"] = str(error)
            report.problems.append(f"{name}: {error}")
            continue
        unit["images"], unit["triplets"] = len(data.gallery_ids), data.info["records"]
        unit["skipped_records"] = data.info["skipped_records"]
        for image_id in data.gallery_ids:
            try:  # each path on its own: one bad entry is that image's problem, not the whole split's
                path = data.images.path_of(image_id)
                entry = files.get(path) or files.setdefault(path, _Image(path=path, store=data.images))
            except (UnsafePathError, ImageLoadError) as error:
                entry = bad_paths.setdefault(image_id, _Image(path=None, status="bad_path", error=str(error)))
            if image_id not in entry.names:
                entry.names.append(image_id)
        loaded.append((unit, data))
    entries = list(files.values())
    for entry in progress_bar(entries, desc=f"check-data: {report.mode} check of the images",
                              show_progress=show_progress):
        _inspect(entry, max_pixels, decode)
    duplicates = _duplicate_groups(entries, decode)
    entries += bad_paths.values()
    bad = {n: e for e in entries if e.status != "ok" for n in e.names}
    twin: dict[str, set[str]] = defaultdict(set)
    for group in duplicates:
        for image_id in group["names"]:
            twin[image_id].update(n for n in group["names"] if n != image_id)
    report.images = {"checked": len(files), "duplicates": duplicates}
    for kind in _KINDS:
        report.images[kind] = [{"names": sorted(e.names), "path": None if e.path is None else str(e.path),
                                "error": e.error} for e in entries if e.status == kind]
    for unit, data in loaded:
        _fill_unit(unit, data, bad, twin, report)
    _advise(report, dataset, decode)
    report.seconds = time.perf_counter() - start
    logger.info("check-data %s: %d files in %.1f s, ok=%s", dataset, len(entries), report.seconds, report.ok)
    return report


def _fill_unit(unit: dict, data: Any, bad: Mapping[str, _Image], twin: Mapping[str, set],
               report: DataCheckReport) -> None:
    """Per split: the bad images, the triplets and gallery entries they break, counts against the official ones."""
    name = unit["name"]
    gallery = set(data.gallery_ids)
    unit["bad_images"] = [i for i in data.gallery_ids if i in bad]
    unit["broken_gallery"] = list(unit["bad_images"])
    for position, triplet in enumerate(data.triplets):
        involved = [triplet.reference, *([triplet.target] if triplet.target is not None else []), *triplet.members]
        broken = sorted({i for i in involved if i in bad})
        query = triplet.pair_id if triplet.pair_id is not None else position
        if broken:
            unit["broken_triplets"].append({"query": query, "reference": triplet.reference,
                                            "target": triplet.target, "bad_images": broken})
        if triplet.target is not None and twin.get(triplet.target, set()) & gallery:
            unit["ambiguous_targets"].append({"query": query, "target": triplet.target,
                                              "copies": sorted(twin[triplet.target] & gallery)})
    if unit["bad_images"]:
        report.problems.append(f"{name}: {len(unit['bad_images'])} of {unit['images']} images cannot be used; they "
                               f"break {len(unit['broken_triplets'])} of {len(data.triplets)} triplets and "
                               f"{len(unit['broken_gallery'])} gallery entries")
    if unit["skipped_records"]:
        first = unit["skipped_records"][0]
        report.problems.append(f"{name}: {len(unit['skipped_records'])} annotation records are invalid (first: "
                               f"{first['file']} record {first['index']}, field {first['field']!r}: "
                               f"{first['problem']})")
    if unit["ambiguous_targets"]:
        report.warnings.append(f"{name}: {len(unit['ambiguous_targets'])} triplets have a target with an identical "
                               "copy under another name in the same gallery")
    official = unit["official"]
    if official is not None:
        unit["counts_match"] = unit["images"] == official["images"] and unit["triplets"] == official["triplets"]
        if not unit["counts_match"]:
            report.problems.append(f"{name}: {unit['images']} images / {unit['triplets']} triplets in the files, the "
                                   f"official release has {official['images']} / {official['triplets']}")
    elif report.counts_source is not None:
        report.warnings.append(f"{name}: no official counts for this split name; counts not compared")


def _advise(report: DataCheckReport, dataset: str, decode: bool) -> None:
    images, splits = report.images, report.splits
    source = ("CIRR's images come from NLVR2: ask the NLVR2 authors for the direct image download (the URL list "
              "has many dead links)" if dataset == "cirr" else
              "make the world again (cir-plugins world --root ROOT --overwrite)" if dataset == "synthetic" else
              "FashionIQ's image links are partly dead: get the missing files from a complete copy")
    if images["duplicates"]:
        big = max(len(g["names"]) for g in images["duplicates"])
        report.warnings.append(f"{len(images['duplicates'])} groups of names hold the same image (largest: {big} "
                               "names)")
    report.advice += [advice for wanted, advice in [
        (images["missing"] or images["empty"], f"missing or empty files: {source}, then run check-data again; until "
         "then, evaluating on this tree does not give numbers comparable with published ones"),
        (images["bad_path"], "bad image paths: an image linked from outside the root or through a looping link (put "
         "the image file itself under the root), a file or folder name over the file system's limit (shorten it), or "
         "a split-file entry with '..', an absolute path or a NUL (fix that entry); the images are listed above with "
         "the cause"),
        (images["too_large"], "images too large for the pixel limit (a decompression-bomb guard; a very thin image "
         "grows inside the padding or resize of --transform): drop them (--skip-unreadable) or replace them with "
         "sane-sized images"),
        (images["truncated"] or images["corrupt"], "truncated or corrupt files: download those files again (the list "
         "is in --report); to train now, drop them with ImageStore.readable_ids or augment --skip-unreadable"),
        (any(u["error"] for u in splits), "an annotation or split file did not load: put the official file at the "
         "path named above (or restrict the check with --splits)"),
        (any(u["skipped_records"] for u in splits), "invalid records: replace the annotation file with the official "
         "one (loaders skip such records only with on_bad_record='skip')"),
        (any(u["counts_match"] is False for u in splits), "counts differ from the official release: the annotation "
         "files are of another version or cut short; use the official files (pass --counts none for a subset on "
         "purpose)"),
        (images["duplicates"], "duplicates: a large group of one image is usually a placeholder saved for dead links "
         "(download those again); a few identical pairs can be genuine, and the library groups them "
         "(data/dedup.py, the bank's shared rows)"),
        (not decode and report.ok, "headers and end markers only were read: run with --decode once to decode every "
         "image"),
    ] if wanted]
