"""Check a CIRR or FashionIQ download before training on it: :func:`check_dataset`.

Every annotation and split file is read with the package's own loaders (``load_cirr`` /
``load_fashioniq``, records validated, bad records counted instead of raised), then every image
they name is checked once:

- its path stays under the root and resolves (a symlink leading out or looping, a name over the file
  system's limit, a NUL or ``..`` in the split file are reported for that image, the rest of its split is
  still checked);
- it exists, is a regular file and is not empty;
- its size passes the decompression-bomb limit, for the source and for every image the ``transform`` makes
  on the way (as training and build-bank with the same ``--transform`` would refuse a 200000 x 1 PNG);
- it opens: by default only the header is read (format and size),
  plus, for PNG and JPEG, the end-of-file marker (``IEND`` / ``FFD9``), which catches the usual
  cut-off download without decoding pixels; ``decode=True`` decodes every image fully through
  :meth:`ImageStore.load_pil` (what training will do);
- it is not a copy of another name: files of equal size are hashed (blake2b of the bytes), with
  ``decode=True`` the decoded pixels are hashed (:func:`cir_plugins.data.dedup.pixel_hash`),
  and two names that resolve to the same file count too.

Counts per split (images in the split file, records in the captions file) are compared with
:data:`OFFICIAL_COUNTS`; for the synthetic world (``dataset="synthetic"``, or a ``"cirr"`` root that holds the
world's record ``synthetic/world.json``) the splits are train, val and test and the counts those the world
recorded when it was made. The result is a :class:`DataCheckReport`: what is missing, corrupt or
duplicated, which triplets and gallery entries that breaks, and what to do. The library never
prints; ``cir-plugins check-data`` prints :meth:`DataCheckReport.format` and exits non-zero when
:attr:`DataCheckReport.ok` is false.
"""

from __future__ import annotations

import hashlib
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
from ..errors import AnnotationError, ConfigError, DataError, ImageLoadError, UnsafePathError, explain
from .fashioniq import CATEGORIES, load_split
from .images import DEFAULT_MAX_PIXELS, OwnPixelLimit, make_transform, open_image_file

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
    "cirr": {
        "train": {"images": 16939, "triplets": 28225},
        "val": {"images": 2297, "triplets": 4181},
        "test1": {"images": 2315, "triplets": 4148},
    },
    "fashioniq": {
        "dress/train": {"images": 11452, "triplets": 5985},
        "dress/val": {"images": 3817, "triplets": 2017},
        "dress/test": {"images": 3818, "triplets": 2024},
        "shirt/train": {"images": 19036, "triplets": 5988},
        "shirt/val": {"images": 6346, "triplets": 2038},
        "shirt/test": {"images": 6346, "triplets": 2038},
        "toptee/train": {"images": 16121, "triplets": 6027},
        "toptee/val": {"images": 5373, "triplets": 1961},
        "toptee/test": {"images": 5374, "triplets": 2056},
    },
}

_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_TAIL_BYTES = 1024
_HASH_BLOCK = 1 << 20
_SHOWN = 10  # names listed per problem in the text report (the JSON lists every one)
# what can be wrong with one image: its path (leaves the root, cannot be resolved), its file, its size
_KINDS = ("bad_path", "missing", "empty", "truncated", "corrupt", "too_large")


@dataclass
class _Image:
    """One image file named by the annotation files (several names may share one file)."""

    path: Path | None  # None: the path in the split file does not resolve under the root
    names: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    store: Any = None  # an ImageStore that knows one of the names (full decode goes through it)
    status: str = "ok"  # "ok" or one of _KINDS
    error: str | None = None
    digest: str | None = None


@dataclass
class DataCheckReport:
    """What :func:`check_dataset` found. ``ok`` is False when anything makes the tree incomplete.

    Fields:
        dataset, root, mode: the inputs ("header" or "decode").
        splits: one dict per split (CIRR) or category/split (FashionIQ): ``name``, ``images``,
            ``triplets`` (records in the file), ``official`` (counts or None), ``counts_match``,
            ``error`` (a file-level problem that stopped the split from loading), ``skipped_records``,
            ``bad_images``, ``broken_triplets``, ``broken_gallery``, ``ambiguous_targets``.
        images: ``checked`` (files), ``bad_path`` / ``missing`` / ``empty`` / ``truncated`` / ``corrupt`` /
            ``too_large`` (lists of ``{"names", "path", "error"}``; ``path`` is None for a bad path) and
            ``duplicates`` (lists of ``{"names", "paths", "kind"}``).
        problems: sentences, one per problem that makes the tree incomplete.
        warnings: sentences about things that do not (duplicates).
        advice: what to do, one sentence per kind of problem found.
        seconds: wall time of the check.
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
            entries = self.images.get(kind, [])
            if entries:
                shown = ", ".join(", ".join(e["names"]) for e in entries[:_SHOWN])
                more = f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
                cause = f" (first: {entries[0]['error']})" if kind in ("bad_path", "too_large") else ""
                lines.append(f"  {kind.replace('_', ' ')} ({len(entries)}): {shown}{more}{cause}")
        duplicates = self.images.get("duplicates", [])
        if duplicates:
            shown = "; ".join(" = ".join(group["names"]) for group in duplicates[:_SHOWN])
            more = f" and {len(duplicates) - _SHOWN} more groups" if len(duplicates) > _SHOWN else ""
            lines.append(f"  duplicates ({len(duplicates)} groups): {shown}{more}")
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"to do: {a}" for a in self.advice]
        return "\n".join(lines)


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
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown or not cats:
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
            from .synthetic import world_record  # noqa: PLC0415 (the world's generator, only for its record)

            record = world_record(root)
            if record is None:
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


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _inspect_header(entry: _Image, max_pixels: int | None) -> None:
    """Header-only check of one file: sets ``entry.status`` / ``entry.error``."""
    header = _header(entry, max_pixels)
    if header is None:
        return
    kind, size = header
    marker = {"PNG": _PNG_END, "JPEG": _JPEG_END}.get(kind)
    if marker is not None:
        with open_image_file(entry.path, what=f"image {entry.names[0]!r}") as handle:
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
        if marker not in tail:
            entry.status = "truncated"
            entry.error = f"{kind} file without its end marker ({size} bytes): cut off"


def _header(entry: _Image, max_pixels: int | None) -> tuple[str, int] | None:
    """(format, bytes) of one file from its header, through the loaders' checked open (regular files only);
    None with ``entry.status`` set when it is missing, not a regular file, empty, unreadable, or too large
    (over ``max_pixels``, itself or inside the split's transform, as :meth:`ImageStore.load_pil` refuses)."""
    path = entry.path
    try:
        info = path.stat()
    except FileNotFoundError:
        entry.status, entry.error = "missing", "no such file"
        return None
    except OSError as error:
        entry.status, entry.error = "corrupt", f"{type(error).__name__}: {error.strerror or error}"
        return None
    if not path.is_file():
        entry.status, entry.error = "corrupt", "not a regular file"
        return None
    if info.st_size == 0:
        entry.status, entry.error = "empty", "zero-byte file"
        return None
    what = f"image {entry.names[0]!r}"
    try:
        with open_image_file(path, what=what) as handle, OwnPixelLimit(), Image.open(handle) as image:
            width, height = image.size
            kind = image.format
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad files
        entry.status, entry.error = "corrupt", f"{type(error).__name__}: {error}"
        return None
    if max_pixels is not None and width * height > max_pixels:
        entry.status, entry.error = "too_large", f"{width}x{height} pixels exceed the limit {max_pixels}"
        return None
    check_size = getattr(entry.store.transform, "check_size", None)  # a named transform's bound on what it makes
    if callable(check_size):
        try:
            check_size(width, height, what=what)
        except ImageLoadError as error:
            entry.status, entry.error = "too_large", str(error)
            return None
    return kind, info.st_size


def _inspect_decode(entry: _Image, max_pixels: int | None) -> None:
    """Full decode through the split's ImageStore (the loader's own checks) after the header's; pixel hash for
    duplicates."""
    from .dedup import pixel_hash

    if _header(entry, max_pixels) is None:
        return
    try:
        image = entry.store.load_pil(entry.names[0])
    except ImageLoadError as error:
        entry.status, entry.error = "corrupt", str(error)
        return
    entry.digest = pixel_hash(image)


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
                    entry.digest = _file_digest(entry.path)
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
    """Check a dataset tree: annotation files, every image they name, duplicates and official counts.

    Args:
        root: the dataset root (CIRR: holds ``cirr/``; FashionIQ: holds ``captions/``, ``image_splits/``,
            ``images/``).
        dataset: "cirr" (also the synthetic world's layout) or "fashioniq".
        decode: False (default) reads headers and end markers only; True decodes every image.
        splits: split names to check (default: all the dataset ships, :data:`DEFAULT_SPLITS`).
        categories: FashionIQ categories (default all three).
        counts: "official" compares with :data:`OFFICIAL_COUNTS`; None skips the comparison; or a
            mapping unit name -> {"images": n, "triplets": m} (unit: split, or "category/split").
        max_pixels: decompression-bomb limit (as :class:`ImageStore`).
        transform, image_size: the preprocessing training or build-bank will use (a name in
            :data:`~cir_plugins.data.images.TRANSFORM_NAMES`): an image that would grow past ``max_pixels``
            inside it (a very thin image padded or resized) is reported as too large.
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
    from .synthetic import world_record  # noqa: PLC0415 (the world's generator, only for its record)

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
        unit: dict[str, Any] = {"name": name, "images": None, "triplets": None, "official": None,
                                "counts_match": None, "error": None, "skipped_records": [], "bad_images": [],
                                "broken_triplets": [], "broken_gallery": [], "ambiguous_targets": []}
        report.splits.append(unit)
        if official is not None:
            unit["official"] = dict(official[name]) if name in official else None
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
            except (UnsafePathError, ImageLoadError) as error:
                path = bad_paths[image_id] = bad_paths.get(image_id) or _Image(path=None, status="bad_path",
                                                                               error=str(error))
            entry = path if isinstance(path, _Image) else files.get(path)
            if entry is None:
                entry = files[path] = _Image(path=path, store=data.images)
            if image_id not in entry.names:
                entry.names.append(image_id)
            entry.units.append(name)
        loaded.append((unit, data))
    entries = list(files.values())
    for entry in progress_bar(entries, desc=f"check-data: {report.mode} check of the images",
                              show_progress=show_progress):
        if decode:
            _inspect_decode(entry, max_pixels)
        else:
            _inspect_header(entry, max_pixels)
    duplicates = _duplicate_groups(entries, decode)
    entries += bad_paths.values()
    bad = {n: e for e in entries if e.status != "ok" for n in e.names}
    twin: dict[str, set[str]] = {}
    for group in duplicates:
        for image_id in group["names"]:
            twin.setdefault(image_id, set()).update(n for n in group["names"] if n != image_id)
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
    images = report.images
    source = ("CIRR's images come from NLVR2: ask the NLVR2 authors for the direct image download (the URL list "
              "has many dead links)" if dataset == "cirr" else
              "make the world again (cir-plugins world --root ROOT --overwrite)" if dataset == "synthetic" else
              "FashionIQ's image links are partly dead: get the missing files from a complete copy")
    if images["missing"] or images["empty"]:
        report.advice.append(f"missing or empty files: {source}, then run check-data again; until then, evaluating "
                             "on this tree does not give numbers comparable with published ones")
    if images["bad_path"]:
        report.advice.append("bad image paths: an image linked from outside the root or through a looping link "
                             "(put the image file itself under the root), a file or folder name over the file "
                             "system's limit (shorten it), or a split-file entry with '..', an absolute path or a NUL "
                             "(fix that entry); the images are listed above with the cause")
    if images["too_large"]:
        report.advice.append("images too large for the pixel limit (a decompression-bomb guard; a very thin image "
                             "grows inside the padding or resize of --transform): drop them (--skip-unreadable) or "
                             "replace them with sane-sized images")
    if images["truncated"] or images["corrupt"]:
        report.advice.append("truncated or corrupt files: download those files again (the list is in --report); "
                             "to train now, drop them with ImageStore.readable_ids or augment --skip-unreadable")
    if any(u["error"] for u in report.splits):
        report.advice.append("an annotation or split file did not load: put the official file at the path named "
                             "above (or restrict the check with --splits)")
    if any(u["skipped_records"] for u in report.splits):
        report.advice.append("invalid records: replace the annotation file with the official one (loaders skip such "
                             "records only with on_bad_record='skip')")
    if any(u["counts_match"] is False for u in report.splits):
        report.advice.append("counts differ from the official release: the annotation files are of another version "
                             "or cut short; use the official files (pass --counts none for a subset on purpose)")
    if images["duplicates"]:
        big = max(len(g["names"]) for g in images["duplicates"])
        report.warnings.append(f"{len(images['duplicates'])} groups of names hold the same image (largest: {big} "
                               "names)")
        report.advice.append("duplicates: a large group of one image is usually a placeholder saved for dead links "
                             "(download those again); a few identical pairs can be genuine, and the library groups "
                             "them (positives/dedup.py, the bank's shared rows)")
    if not decode and report.ok:
        report.advice.append("headers and end markers only were read: run with --decode once to decode every image")
