"""Write and read generated triplets in the CIRR and FashionIQ annotation schemas.

CIRR (``cap.rc2.*.json`` shape), one record per triplet::

    {"pairid": int, "reference": id, "target_hard": id, "target_soft": {target: 1.0},
     "caption": texts[0], "img_set": {"id": -1, "members": [reference, target],
     "reference_rank": 0, "target_rank": 1},
     "source": "generated", "captions": [every candidate text],
     "reference_caption": str, "target_caption": str, "templates": [...]}

FashionIQ (``cap.{category}.*.json`` shape)::

    {"candidate": id, "target": id, "captions": [c0, c1], "source": "generated",
     "texts": [every candidate text], "reference_caption": ..., "target_caption": ..., "templates": [...]}

A generated pair has no 6-image set: ``load_cirr(root, split, set_size=None)`` reads such a CIRR file. The
FashionIQ loader expects exactly two ``captions``: one candidate text is written as ``[t, t]`` (three or more:
the first two); the exact texts are in ``texts``, which :func:`read_generated` uses. The loaders ignore the
extra fields. Files are written atomically (:mod:`cir_plugins._atomic`).

Reading (:func:`read_generated`): a record without ``source`` is generated. The method's release files are read
as published, so captioning can be skipped (docs/method.md section 2): CIRR ``cap.rc2.train.extend_{model}.json``
(``{"target_hard", "reference", "caption": [texts] or one text, "pairid": 0, "img_set": {"members": [...]},
"caption1", "caption2"}``) and FashionIQ ``cap.extend_{model}.train.json`` (``{"target", "candidate",
"captions": [texts], "caption1", "caption2"}``); ``caption1`` / ``caption2`` (the reference and target
captions) become ``meta["reference_caption"]`` / ``meta["target_caption"]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import _atomic
from ..data._annotations import read_json
from ..data.triplet import Triplet
from ..errors import AnnotationError, ConfigError, explain

__all__ = ["write_generated_cirr", "write_generated_fashioniq", "read_generated"]

logger = logging.getLogger(__name__)

_META_KEYS = ("reference_caption", "target_caption", "templates")


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (indent 1, non-ASCII kept, a final newline)."""
    return _atomic.atomic_write_json(path, data, indent=1, ensure_ascii=False, trailing_newline=True,
                                     make_parents=True)


def _check_generated(triplets: Sequence[Triplet]) -> None:
    for index, triplet in enumerate(triplets):
        if not isinstance(triplet, Triplet) or triplet.target is None:
            raise ConfigError(explain(f"triplet {index} cannot be written: it needs a reference and a target",
                                      got=triplet, fix="pass the augmenter's Triplets"))


def _extra(triplet: Triplet) -> dict[str, Any]:
    return {key: (list(triplet.meta[key]) if key == "templates" else triplet.meta[key])
            for key in _META_KEYS if key in triplet.meta}


def write_generated_cirr(triplets: Sequence[Triplet], path: str | os.PathLike, *, first_pair_id: int = 0) -> Path:
    """Write triplets as a CIRR ``cap.rc2`` list; pair ids count up from ``first_pair_id``."""
    _check_generated(triplets)
    records = [{"pairid": first_pair_id + offset, "reference": t.reference, "target_hard": t.target,
                "target_soft": {t.target: 1.0}, "caption": t.texts[0],
                "img_set": {"id": -1, "members": [t.reference, t.target], "reference_rank": 0, "target_rank": 1},
                "source": t.source, "captions": list(t.texts), **_extra(t)} for offset, t in enumerate(triplets)]
    logger.info("writing %d generated CIRR records to %s", len(records), path)
    return atomic_write_json(path, records)


def write_generated_fashioniq(triplets: Sequence[Triplet], path: str | os.PathLike) -> Path:
    """Write triplets as a FashionIQ ``cap.{category}`` list (see the module notes on ``captions``)."""
    _check_generated(triplets)
    records = [{"candidate": t.reference, "target": t.target, "captions": [t.texts[0], t.texts[1 % len(t.texts)]],
                "source": t.source, "texts": list(t.texts), **_extra(t)} for t in triplets]
    logger.info("writing %d generated FashionIQ records to %s", len(records), path)
    return atomic_write_json(path, records)


def _texts(path: Path, index: int, record: dict, key: str) -> tuple[str, ...]:
    texts = record.get(key)
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise AnnotationError(explain(f"{path}, record {index}: {key!r} must be a non-empty list of non-empty strings",
                                      got=texts))
    return tuple(texts)


def _name(path: Path, index: int, record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise AnnotationError(explain(f"{path}, record {index}: {key!r} must be a non-empty image id", got=value))
    return value


# the release's names of the two image captions -> ours
_RELEASE_META = {"caption1": "reference_caption", "caption2": "target_caption"}


def _meta(record: dict) -> dict[str, Any]:
    meta = {key: record[key] for key in _META_KEYS if key in record}
    for theirs, ours in _RELEASE_META.items():
        if ours not in meta and isinstance(record.get(theirs), str):
            meta[ours] = record[theirs]
    if "templates" in meta:
        meta["templates"] = tuple(meta["templates"])
    return meta


def _source(path: Path, index: int, record: dict) -> str:
    """The record's ``source``; absent -> "generated" (these readers are for generated files)."""
    source = record.get("source", "generated")
    if source not in ("annotated", "generated"):
        raise AnnotationError(explain(f"{path}, record {index}: 'source' must be 'annotated' or 'generated'",
                                      got=source, fix="drop the field (generated) or fix its value"))
    return source


def _cirr_texts(path: Path, index: int, record: dict) -> tuple[str, ...]:
    if "captions" in record:
        return _texts(path, index, record, "captions")
    caption = record.get("caption")
    return _texts(path, index, {"caption": caption if isinstance(caption, list) else [caption]}, "caption")


def _cirr_triplets(path: Path, records: list) -> list[Triplet]:
    return [Triplet(texts=_cirr_texts(path, index, record), reference=_name(path, index, record, "reference"),
                    target=_name(path, index, record, "target_hard"), source=_source(path, index, record),
                    pair_id=record.get("pairid"), members=tuple((record.get("img_set") or {}).get("members", ())),
                    meta=_meta(record)) for index, record in enumerate(records)]


def _fashioniq_triplets(path: Path, records: list) -> list[Triplet]:
    return [Triplet(texts=_texts(path, index, record, "texts" if "texts" in record else "captions"),
                    reference=_name(path, index, record, "candidate"), target=_name(path, index, record, "target"),
                    source=_source(path, index, record), meta=_meta(record)) for index, record in enumerate(records)]


def _plain_triplets(path: Path, records: list) -> list[Triplet]:
    out = []
    for index, record in enumerate(records):
        texts = record.get("texts", record.get("text"))
        texts = _texts(path, index, {"texts": [texts] if isinstance(texts, str) else texts}, "texts")
        out.append(Triplet(reference=_name(path, index, record, "reference"), texts=texts,
                           target=_name(path, index, record, "target"), source=_source(path, index, record),
                           meta=record.get("meta") or {}))
    return out


def read_generated(path: str | os.PathLike) -> list[Triplet]:
    """The package's one reader of triplet files, told apart by the first record's keys: the CIRR schema
    (``target_hard``; what :func:`write_generated_cirr` writes and the release's cap.rc2 lists), the FashionIQ
    schema (``candidate``; :func:`write_generated_fashioniq`, the release's ``cap.extend_*`` files), or plain
    records (``reference``, ``texts`` or ``text``, ``target``, optional ``source`` / ``meta``), as a list or
    under ``{"triplets": [...]}``. Texts: CIRR ``captions`` else ``caption``; FashionIQ ``texts`` else
    ``captions``; ``source`` "generated" when absent; ``caption1`` / ``caption2`` -> meta reference / target
    caption. AnnotationError naming the file and the record for anything else."""
    path = Path(path)
    data = read_json(path, available=None)
    records = data.get("triplets") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise AnnotationError(explain(f"{path} must hold a JSON list of triplet records", got=type(data).__name__,
                                      fix="pass a file of generated triplets (a JSON list of records)"))
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise AnnotationError(explain(f"{path}, record {index}: must be an object", got=type(record).__name__))
    first = records[0] if records else {}
    if "target_hard" in first:
        return _cirr_triplets(path, records)
    if "candidate" in first:
        return _fashioniq_triplets(path, records)
    if "reference" in first or not records:
        return _plain_triplets(path, records)
    raise AnnotationError(explain(f"{path} is in no triplet schema", got=sorted(first)[:8],
                                  expected="CIRR records (reference, target_hard, caption), FashionIQ records "
                                           "(candidate, target, captions) or (reference, texts, target)"))
