"""The CIRR test-server files. The test1 split has no targets, so nothing here computes a metric:
:func:`rank_cirr` ranks each query (reference removed; ``img_set.members`` minus the reference for the
subset list), :func:`validate_cirr_submission` rejects whatever the server would, :func:`write_cirr_submission`
writes the two JSON files atomically with a manifest, and :func:`check_cirr_submission` tells a complete pair
from an interrupted write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from ._utils import file_sha256
from .errors import DataError, SubmissionError, explain
from .evaluation import EvalFeatures, extract_features, gallery_rows
from .metrics import topk_rows
from .similarity import similarity

__all__ = ["CIRRRanking", "ranking_from_features", "rank_cirr", "validate_cirr_submission", "write_cirr_submission",
           "check_cirr_submission", "submit_cirr", "SUBMISSION_FORMAT"]

logger = logging.getLogger(__name__)

SUBMISSION_FORMAT = "cir_plugins.cirr_submission"


@dataclass
class CIRRRanking:
    """Per-query rankings for the CIRR server, in split order, best first."""

    pair_ids: list[int]
    recall_names: list[list[str]]  # per query, the k best gallery names (reference excluded)
    subset_names: list[list[str]]  # per query, the subset_k best of img_set.members minus the reference


def _subset_order(features: EvalFeatures, query_index: int, rows: list[int]) -> list[int]:
    """Rows sorted best first (ties: lower row first) by the model's similarity."""
    q = features.query[query_index]  # (D,)
    g = features.gallery[torch.tensor(rows, device=q.device)]  # (S, D) or (S, T, D)
    scores = similarity(q[None], g, features.similarity, bf16=False)[0]  # (1, S) -> (S,)
    return [r for _, r in sorted(zip((-scores).tolist(), rows))]


def ranking_from_features(features: EvalFeatures, *, k: int = 50, subset_k: int = 3,
                          chunk_size: int | None = None) -> CIRRRanking:
    """Top-``k`` gallery names per query (reference removed) and top-``subset_k`` group names."""
    triplets = features.triplets
    ref_rows = gallery_rows(features, [t.reference for t in triplets], "reference images")
    _, rows = topk_rows(features.query, features.gallery, k, exclude_rows=ref_rows[:, None], chunk_size=chunk_size,
                        similarity=features.similarity)  # (Q, k)
    recall_names, subset_names = [], []
    for i, t in enumerate(triplets):
        recall_names.append([features.gallery_ids[r] for r in rows[i].tolist() if r >= 0])
        others = [m for m in t.members if m != t.reference]
        if len(others) < subset_k:
            raise DataError(explain(f"query {i} (pair {t.pair_id}) has too few group members for the subset ranking",
                                    got=len(others), expected=f">= {subset_k} besides the reference",
                                    fix="check img_set.members"))
        order = _subset_order(features, i, gallery_rows(features, others, "img_set members").tolist())
        subset_names.append([features.gallery_ids[r] for r in order[:subset_k]])
    return CIRRRanking(pair_ids=[t.pair_id for t in triplets], recall_names=recall_names, subset_names=subset_names)


def rank_cirr(model: Any, split: Any, *, k: int = 50, subset_k: int = 3, batch_size: int = 64,
              device: torch.device | str | None = None, show_progress: bool = True) -> CIRRRanking:
    """The raw per-query rankings the CIRR server wants (works on splits without targets)."""
    features = extract_features(model, split, batch_size=batch_size, device=device, show_progress=show_progress)
    return ranking_from_features(features, k=k, subset_k=subset_k)


def validate_cirr_submission(pair_ids: Sequence[int], recall_names: Sequence[Sequence[str]],
                             subset_names: Sequence[Sequence[str]], *, split: Any = None, k: int = 50,
                             subset_k: int = 3) -> None:
    """Raise SubmissionError for anything the server would reject (see write_cirr_submission)."""
    def fail(problem, got=None, expected=None, fix="regenerate the rankings with rank_cirr on the test1 split"):
        raise SubmissionError(explain(problem, got=got, expected=expected, fix=fix))

    if not (len(pair_ids) == len(recall_names) == len(subset_names)):
        fail("pair_ids, recall_names and subset_names differ in length",
             got=(len(pair_ids), len(recall_names), len(subset_names)), expected="three equal lengths")
    seen: set[int] = set()
    for pid in pair_ids:
        if not isinstance(pid, int) or isinstance(pid, bool):
            fail("a pair id is not an int", got=pid)
        if pid in seen:
            fail("a pair id appears twice", got=pid, expected="each test pair exactly once")
        seen.add(pid)
    for names_list, want, label in ((recall_names, k, "recall"), (subset_names, subset_k, "recall_subset")):
        for pid, names in zip(pair_ids, names_list):
            if isinstance(names, str) or not isinstance(names, Sequence):
                fail(f"{label} names of pair {pid} must be a list", got=type(names).__name__)
            if len(names) != want:
                fail(f"{label} of pair {pid} has the wrong number of names", got=len(names), expected=want)
            for name in names:
                if not isinstance(name, str) or not name.strip():
                    fail(f"{label} of pair {pid} has a name that is not a non-empty string", got=name)
                if name.lower().endswith((".png", ".jpg", ".jpeg")):
                    fail(f"{label} of pair {pid} has a file extension in a name", got=name,
                         expected="image names without extension")
            if len(set(names)) != len(names):
                fail(f"{label} of pair {pid} names an image twice",
                     got=[n for n in names if list(names).count(n) > 1][:3])
    if split is None:
        logger.warning("CIRR submission validated without the split: pair coverage, reference exclusion, "
                       "group membership and gallery names were not checked")
        return
    by_pair = {t.pair_id: t for t in split.triplets}
    if missing := sorted(set(by_pair) - seen):
        fail("test pairs are missing from the submission", got=f"{len(missing)} missing, e.g. {missing[:5]}",
             expected=f"all {len(by_pair)} pairs of {getattr(split, 'split', 'the split')}")
    if extra := sorted(seen - set(by_pair)):
        fail("the submission has pair ids that are not in the split", got=extra[:5])
    gallery = set(split.gallery_ids)
    for pid, recall, subset in zip(pair_ids, recall_names, subset_names):
        triplet = by_pair[pid]
        for label, names in (("recall", recall), ("recall_subset", subset)):
            if triplet.reference in names:
                fail(f"{label} of pair {pid} contains the reference image", got=triplet.reference,
                     expected="the reference excluded")
            if unknown := [n for n in names if n not in gallery]:
                fail(f"{label} of pair {pid} names images not in the gallery", got=unknown[:3])
        allowed = set(triplet.members) - {triplet.reference}
        if outside := [n for n in subset if n not in allowed]:
            fail(f"recall_subset of pair {pid} names images outside img_set.members minus the reference",
                 got=outside, expected=sorted(allowed))


def write_cirr_submission(out_dir: str | os.PathLike, pair_ids: Sequence[int], recall_names: Sequence[Sequence[str]],
                          subset_names: Sequence[Sequence[str]], *, split: Any = None, version: str = "rc2",
                          name: str = "cirr") -> tuple[Path, Path]:
    """Validate and write the two CIRR server files; returns (path_recall, path_subset).

    Files: ``{out_dir}/recall_submission_{name}.json`` = {"version": version, "metric": "recall",
    "<pairid>": [50 names]} and ``recall_subset_submission_{name}.json`` (metric "recall_subset", 3 names).

    Validation (SubmissionError, nothing written): equal lengths, int pair ids each once, 50 / 3 unique
    non-empty names without extensions; with ``split`` (the test1 Split) also every pair of the split
    exactly once and no other, the reference excluded, names in the gallery, subset names from
    img_set.members minus the reference (without ``split`` these are skipped, with a warning).

    Each file is written atomically; the manifest ``submission_{name}.manifest.json`` (the SHA-256 of both)
    is removed before the first and written after the second, so after an interruption
    :func:`check_cirr_submission` tells a complete pair from a partial one; re-running completes the pair.
    """
    validate_cirr_submission(pair_ids, recall_names, subset_names, split=split)
    if not isinstance(version, str) or not version:
        raise SubmissionError(explain("version must be a non-empty string", got=version, expected="rc2"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recall = {"version": version, "metric": "recall", **{str(p): list(n) for p, n in zip(pair_ids, recall_names)}}
    subset = {"version": version, "metric": "recall_subset",
              **{str(p): list(n) for p, n in zip(pair_ids, subset_names)}}
    path_recall, path_subset, manifest = _submission_paths(out, name)
    if manifest.exists():  # from here until the new manifest is written, the pair is not one to upload
        manifest.unlink()
        fsync_dir(out)
    digests = {}
    for path, document in ((path_recall, recall), (path_subset, subset)):
        data = json.dumps(document).encode("utf-8")
        atomic_write_bytes(path, data)
        digests[path.name] = hashlib.sha256(data).hexdigest()
    atomic_write_json(manifest, {"format": SUBMISSION_FORMAT, "pairs": len(pair_ids), "files": digests}, indent=1)
    logger.info("wrote CIRR submission for %d pairs: %s, %s", len(pair_ids), path_recall, path_subset)
    return path_recall, path_subset


def _submission_paths(out: Path, name: str) -> tuple[Path, Path, Path]:
    """(recall file, recall_subset file, manifest) of submission ``name`` in ``out``."""
    return (out / f"recall_submission_{name}.json", out / f"recall_subset_submission_{name}.json",
            out / f"submission_{name}.manifest.json")


def check_cirr_submission(out_dir: str | os.PathLike, *, name: str = "cirr") -> tuple[Path, Path]:
    """(path_recall, path_subset) of a submission written whole by :func:`write_cirr_submission`; a
    SubmissionError when the manifest is missing (an interrupted write: maybe a new recall file beside an old
    subset file) or unreadable, or a file is missing or differs from the SHA-256 the manifest recorded."""
    out = Path(out_dir)
    path_recall, path_subset, manifest = _submission_paths(out, name)
    fix = "write the submission again (cir-plugins submit / write_cirr_submission); it completes the pair"
    if not manifest.is_file():
        raise SubmissionError(explain(f"the CIRR submission {name!r} in {out} is not a complete pair: its manifest "
                                      "is missing (the write was interrupted, or the files were not written by "
                                      "this library)", got=str(manifest), fix=fix))
    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
        files = document["files"]
        if document.get("format") != SUBMISSION_FORMAT or not isinstance(files, dict):
            raise ValueError("not a submission manifest")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SubmissionError(explain(f"{manifest} is unreadable", got=f"{type(error).__name__}: {error}",
                                      fix=fix)) from error
    for path in (path_recall, path_subset):
        if not path.is_file() or file_sha256(path) != files.get(path.name):
            raise SubmissionError(explain(f"{path} is missing or differs from the file written with its pair",
                                          got=str(path), expected=f"the SHA-256 recorded in {manifest.name}", fix=fix))
    return path_recall, path_subset


def submit_cirr(model: Any, split: Any, out_dir: str | os.PathLike, *, batch_size: int = 64,
                device: torch.device | str | None = None, show_progress: bool = True,
                name: str = "cirr") -> tuple[Path, Path]:
    """Rank the test1 split with ``model`` and write the two validated server files."""
    ranking = rank_cirr(model, split, batch_size=batch_size, device=device, show_progress=show_progress)
    return write_cirr_submission(out_dir, ranking.pair_ids, ranking.recall_names, ranking.subset_names,
                                 split=split, name=name)
