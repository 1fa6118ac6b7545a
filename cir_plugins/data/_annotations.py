"""Shared helpers of the annotation loaders: strict JSON reading and per-record validation. Every problem is an
:class:`~cir_plugins.errors.AnnotationError` naming the file and the record index / field (or the JSON position)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import AnnotationError, ConfigError, explain

__all__ = ["read_json", "read_records", "require_root", "RecordChecker", "BadRecord", "ON_BAD_RECORD"]

logger = logging.getLogger(__name__)

ON_BAD_RECORD = ("error", "skip")


def _no_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        result: dict = {}
        for key, value in pairs:
            if key in result:
                raise AnnotationError(explain(f"{path}: the key {key!r} appears twice in one JSON object",
                                              got=key, fix="keep one entry per key"))
            result[key] = value
        return result
    return hook


def _is(path: Path, kind: str) -> bool:
    """``path.is_file()`` / ``is_dir()``, an AnnotationError (not a raw OSError) for a name over the limit."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except OSError as error:  # ENAMETOOLONG and the like: is_file / is_dir only swallow "not there"
        raise AnnotationError(explain("the path cannot be checked (a name over the filesystem's limit?)",
                                      got=f"{path}: {error}",
                                      fix="shorten the root folder or the split name")) from error


def require_root(root: Path, dataset: str, holds: str) -> None:
    """AnnotationError unless ``root`` is a directory (``holds``: what the folder should hold, for the fix)."""
    if not _is(root, "dir"):
        raise AnnotationError(explain(f"the {dataset} root is not a directory", got=str(root),
                                      fix=f"pass the folder that holds {holds}"))


def read_json(path: Path, *, available: list[str] | None = None) -> Any:
    """Parse ``path``; AnnotationError naming the file (and position) for any failure."""
    if not _is(path, "file"):
        hint = f" (splits present here: {available})" if available is not None else ""
        raise AnnotationError(explain(f"annotation file not found{hint}", got=str(path),
                                      fix="check the dataset root, the split name and the official layout"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise AnnotationError(explain(f"{path} is not UTF-8 text", got=f"byte {error.start}",
                                      fix="re-download the annotation file")) from error
    except OSError as error:
        raise AnnotationError(explain(f"{path} cannot be read", got=str(error), fix="check permissions")) from error
    if not text.strip():
        raise AnnotationError(explain(f"{path} is empty", got=f"{len(text)} characters",
                                      fix="re-download the annotation file"))
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as error:
        raise AnnotationError(explain(f"{path} is malformed or truncated JSON at line {error.lineno} column "
                                      f"{error.colno} (character {error.pos})", got=error.msg,
                                      fix="re-download the file; it may have been cut short")) from error
    except AnnotationError:  # a duplicate key (the hook's own error)
        raise
    except ValueError as error:  # a number of over 4300 digits (Python's int conversion limit)
        raise AnnotationError(explain(f"{path} holds a value JSON parsing refuses (e.g. a number of thousands of "
                                      "digits)", got=str(error)[:120],
                                      fix="fix the file: pair ids and ranks are small integers")) from error
    except RecursionError as error:
        raise AnnotationError(explain(f"{path} nests too deeply to be an annotation file", got="RecursionError",
                                      fix="re-download the annotation file")) from error


def read_records(path: Path, *, available: list[str] | None, fix: str) -> list:
    """The JSON list of caption records in ``path`` (:func:`read_json`); AnnotationError when it is not a list."""
    records = read_json(path, available=available)
    if not isinstance(records, list):
        raise AnnotationError(explain(f"{path} must hold a JSON list of records", got=type(records).__name__, fix=fix))
    return records


class BadRecord(Exception):
    """Internal: one record failed validation (turned into AnnotationError or a counted skip)."""


class RecordChecker:
    """Validate records of one file; raise or count skips per ``on_bad_record``."""

    def __init__(self, path: Path, on_bad_record: str) -> None:
        if on_bad_record not in ON_BAD_RECORD:
            raise ConfigError(explain("on_bad_record must be 'error' or 'skip'", got=on_bad_record,
                                      expected=ON_BAD_RECORD))
        self.path, self.mode = path, on_bad_record
        self.skipped: list[dict] = []

    def fail(self, index: int, field: str, problem: str, got: Any = None, expected: Any = None,
             fix: str = "fix or remove this record, or load with on_bad_record='skip'") -> None:
        """Raise AnnotationError (mode "error") or raise BadRecord after recording the skip."""
        shown = got if got is None or isinstance(got, (str, int, float, bool)) else repr(got)
        shown = shown[:117] + "..." if shown is not got and len(shown) > 120 else shown
        message = explain(f"{self.path}, record {index}, field {field!r}: {problem}", got=shown,
                          expected=expected, fix=fix if self.mode == "error" else None)  # skipping is already on
        if self.mode == "error":
            raise AnnotationError(message)
        logger.warning("skipping a bad record: %s", message)
        self.skipped.append({"file": str(self.path), "index": index, "field": field, "problem": problem})
        raise BadRecord(message)

    def parse_all(self, records: list, parse: Callable[[Any, int, bool | None], Any]) -> tuple[list, dict]:
        """Each record through ``parse(record, index, with_target)`` (``with_target``: whether the first kept
        record had a target); a skipped record is left out. Returns (triplets, the split's ``info``)."""
        triplets: list = []
        with_target: bool | None = None
        for index, record in enumerate(records):
            try:
                triplet = parse(record, index, with_target)
            except BadRecord:
                continue
            with_target = triplet.target is not None if with_target is None else with_target
            triplets.append(triplet)
        if self.skipped:
            logger.warning("%s: skipped %d of %d records", self.path, len(self.skipped), len(records))
        return triplets, {"records": len(records), "skipped": len(self.skipped), "skipped_records": self.skipped,
                          "has_targets": bool(with_target)}

    def require_fields(self, index: int, record: Any, keys: tuple[str, ...]) -> None:
        """``record`` is a JSON object holding every key in ``keys`` (else :meth:`fail`)."""
        if not isinstance(record, dict):
            self.fail(index, "<record>", "a record must be a JSON object", got=type(record).__name__)
        for key in keys:
            if key not in record:
                self.fail(index, key, "required field is missing", got=sorted(record)[:10], expected=f"a {key!r} field")

    def check_image(self, index: int, field: str, value: Any, gallery: Any, fix: str) -> None:
        """``value`` is a non-empty image name found in ``gallery`` (anything supporting ``in``); ``fix`` is the
        advice when it is missing from the gallery."""
        if not self.is_name(value):
            self.fail(index, field, "must be a non-empty image name", got=value)
        if value not in gallery:
            self.fail(index, field, "names an image not in the split's image list", got=value, fix=fix)

    def check_target_presence(self, index: int, field: str, has_target: bool, with_target: bool | None) -> None:
        """Every record of a file has a target or none has (``with_target``: what the first record had)."""
        if with_target is not None and has_target != with_target:
            self.fail(index, field, "some records have a target and others do not",
                      got="present" if has_target else "missing", expected="present" if with_target else "missing")

    @staticmethod
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    @staticmethod
    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    @staticmethod
    def is_name(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())
