"""A negative bank exported to a FAISS index, for large galleries searched on a CPU.

Kinds (optional dependency: ``pip install "cir-plugins[faiss]"``, the ``faiss-cpu`` wheel):

- ``"auto"`` (default): ``"flat"`` below :data:`FLAT_BELOW` rows, else ``"ivfpq"`` (a small bank's exact scan is
  fast, and an IVF index trained on few rows recalls little of the exact top-k).
- ``"flat"``: ``IndexFlatIP``, exact inner product (cosine: the rows are unit length), results equal to
  :func:`cir_plugins.metrics.topk_rows`; N x D x 4 bytes.
- ``"ivfpq"``: ``IVF{nlist},PQ{m}x4fs`` (or ``x{nbits}``), inner product, approximate: its recall@10 against exact
  search (:meth:`FaissIndex.measure_recall`) is logged, kept in ``index.recall`` and saved.

Any FAISS factory string is accepted with ``factory=``. Only single-vector (``"dot"``) banks export.

Files (:meth:`FaissIndex.save` / :meth:`FaissIndex.load`, written atomically): ``PATH``, the index in FAISS's binary
format (``faiss.serialize_index``, not a pickle: nothing executes on load), and ``PATH.json``: format, kind,
factory, dim, rows, the model fingerprint, the :func:`bank_checksum` of the bank it came from, the bank's ids/rows
(so the index alone maps results to image ids), nprobe, the measured recall, and a blake2b digest over the index
bytes and every other entry. Every entry is checked on load (a DataError names the bad one), and
:meth:`FaissIndex.check_bank` accepts the index only for the bank it was built from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._atomic import atomic_write_bytes, atomic_write_json
from ..checks import check_positive_int, check_rows, settle
from ..errors import BankMismatchError, ConfigError, DataError, ShapeError, explain

__all__ = ["FaissIndex", "build_faiss_index", "bank_checksum", "faiss_available", "KINDS", "FLAT_BELOW"]

logger = logging.getLogger(__name__)

FORMAT = "cir_plugins.faiss_index"
VERSION = "2"  # 2: the digest covers the metadata; the bank's checksum and the measured recall are recorded
KINDS = ("auto", "flat", "ivfpq")
#: kind "auto" builds an exact index below this many bank rows and a compressed one from there on
FLAT_BELOW = 100_000
RECALL_K, RECALL_QUERIES = 10, 256  # the recall measured when a compressed index is built


def faiss_available() -> bool:
    """True when the ``faiss`` module imports (``pip install "cir-plugins[faiss]"``)."""
    try:
        return _faiss() is not None
    except ConfigError:
        return False


def _faiss():
    """The faiss module, or ConfigError saying how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise ConfigError(explain("FAISS is not installed", got="import faiss failed",
                                  fix='pip install "cir-plugins[faiss]" (the faiss-cpu wheel)')) from error
    return faiss


def _is_ivf(index: Any) -> Any:
    """The IVF part of a FAISS index, or None when it has none."""
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def _digest(data: bytes, meta: dict) -> str:
    """blake2b over the index bytes and every metadata entry but the digest itself (canonical JSON)."""
    digest = hashlib.blake2b(data, digest_size=20)
    digest.update(json.dumps({k: v for k, v in meta.items() if k != "index_digest"}, sort_keys=True).encode())
    return digest.hexdigest()


def bank_checksum(bank: Any) -> str:
    """SHA-256 over the bank's rows as float32 (what FAISS holds), its ids, their rows and the model fingerprint
    (equal for the same bank in any dtype that float32 holds exactly)."""
    embeddings = bank.embeddings.detach().to("cpu", torch.float32).contiguous()  # (N, D)
    ids = list(bank.ids)
    digest = hashlib.sha256(json.dumps({"ids": ids, "rows": [bank.row_of(i) for i in ids],
                                        "shape": list(embeddings.shape),
                                        "fingerprint": str(bank.fingerprint)}).encode())
    digest.update(embeddings.numpy().tobytes())
    return digest.hexdigest()


def _bad_meta(meta_path: Path, entry: str, got: Any, expected: str) -> DataError:
    text = repr(got)
    return DataError(explain(f"the FAISS index metadata {entry!r} is malformed", got=f"{meta_path.name}: "
                             f"{text[:120] + '...' if len(text) > 120 else text}", expected=expected,
                             fix="export the index again from its bank"))


def _checked_meta(meta: dict, meta_path: Path) -> dict:
    """Every metadata entry of a version-2 index checked for type and range; DataError naming the bad one."""
    def need(key, kinds, expected):
        value = meta.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise _bad_meta(meta_path, key, value, expected)
        return value

    for key in ("kind", "factory", "fingerprint", "bank_checksum", "index_digest"):
        need(key, str, "a string")
    rows, dim = need("rows", int, "an int"), need("dim", int, "an int")
    if rows < 1 or dim < 1:
        raise _bad_meta(meta_path, "rows" if rows < 1 else "dim", rows if rows < 1 else dim, "a positive int")
    if meta.get("nprobe") is not None and need("nprobe", int, "null or a positive int") < 1:
        raise _bad_meta(meta_path, "nprobe", meta["nprobe"], "null or a positive int")
    ids, id_rows = need("ids", list, "a list of image ids"), need("id_rows", list, "a list of rows")
    if not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        raise _bad_meta(meta_path, "ids", ids[:5], "unique image id strings")
    if len(id_rows) != len(ids):
        raise _bad_meta(meta_path, "id_rows", f"{len(id_rows)} rows for {len(ids)} ids", "one row per id")
    if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < rows for r in id_rows) \
            or len(set(id_rows)) != rows:
        raise _bad_meta(meta_path, "id_rows", id_rows[:5], f"ints in [0, {rows}), every row used")
    recall = meta.get("recall")
    if recall is not None and not (isinstance(recall, dict) and isinstance(recall.get("recall"), (int, float))):
        raise _bad_meta(meta_path, "recall", recall, "null or {recall, k, queries, nprobe}")
    return meta


class FaissIndex:
    """A FAISS index over a bank's rows, plus the bank's id -> row map. Build with :func:`build_faiss_index`, persist
    with :meth:`save` / :meth:`load`, query with :meth:`search` (the contract of :func:`cir_plugins.metrics.topk_rows`).
    """

    def __init__(self, index: Any, *, kind: str, factory: str, ids: Sequence[str], rows: Sequence[int],
                 fingerprint: str, bank_checksum: str, nprobe: int | None = None, recall: dict | None = None) -> None:
        self.index, self.kind, self.factory = index, kind, factory
        self.ids, self._rows = list(ids), [int(r) for r in rows]
        self._row_of = dict(zip(self.ids, self._rows))  # id -> row, as NegativeBank's (exclusion_rows reads it)
        self.fingerprint, self.bank_checksum = str(fingerprint), str(bank_checksum)
        self._ids_of_row: list[list[str]] | None = None
        self.nprobe = None
        #: {"recall", "k", "queries", "nprobe"} measured against exact search (None for an exact index or unmeasured)
        self.recall = dict(recall) if recall is not None else None
        if nprobe is not None:
            self.set_nprobe(nprobe)

    def check_bank(self, bank: Any) -> None:
        """BankMismatchError unless this index was built from ``bank`` (its :func:`bank_checksum`, id -> row map)."""
        checksum = bank_checksum(bank)
        if checksum != self.bank_checksum or {i: bank.row_of(i) for i in bank.ids} != self._row_of:
            raise BankMismatchError(explain(
                "the FAISS index was not exported from this bank (its answers would name other images)",
                got=f"index built from bank {self.bank_checksum[:16]} ({len(self)} rows, fingerprint "
                    f"{self.fingerprint[:16]})",
                expected=f"bank {checksum[:16]} ({bank.embeddings.shape[0]} rows, fingerprint "
                         f"{str(bank.fingerprint)[:16]})",
                fix="export the index again from this bank (cir-plugins serve --faiss-export ... --faiss PATH)"))

    def measure_recall(self, embeddings: Tensor, *, queries: int = RECALL_QUERIES, k: int = RECALL_K,
                       seed: int = 0) -> dict:
        """Recall@k against exact search (:func:`cir_plugins.metrics.topk_rows`) over ``embeddings`` (N, D), the rows
        it was built from, ``queries`` seeded rows as queries: the mean share of each exact top-k found in the
        index's top-k. Kept in ``self.recall``."""
        from ..metrics import topk_rows

        n = len(self)
        if embeddings.dim() != 2 or embeddings.shape[0] != n:
            raise ShapeError(explain("measure_recall needs the bank rows the index was built from",
                                     got=tuple(embeddings.shape), expected=f"({n}, {self.dim})"))
        k = min(k, n)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
        sample = embeddings[torch.from_numpy(rows).to(embeddings.device)].detach().to("cpu", torch.float32)
        _, exact = topk_rows(sample, embeddings.detach().to("cpu", torch.float32), k)  # (Q, k)
        _, found = self.search(sample, k)  # (Q, k)
        hits = sum(len(set(a) & set(e)) for a, e in zip(found.tolist(), exact.tolist()))
        self.recall = {"recall": round(hits / exact.numel(), 4), "k": k, "queries": len(rows), "nprobe": self.nprobe}
        return dict(self.recall)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def device(self) -> torch.device:
        """Where :meth:`search` takes its row tensors: the index is searched on the CPU."""
        return torch.device("cpu")

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row_of

    def __repr__(self) -> str:
        probe = f", nprobe={self.nprobe}" if self.nprobe is not None else ""
        if self.recall is not None:
            probe += f", recall@{self.recall['k']}={self.recall['recall']:.3f}"
        return f"FaissIndex(kind={self.kind!r}, factory={self.factory!r}, rows={len(self)}, dim={self.dim}{probe})"

    def set_nprobe(self, nprobe: int) -> None:
        """Lists visited per query (IVF indexes only; more = slower and closer to exact)."""
        check_positive_int("nprobe", nprobe, fix="e.g. nprobe=32")
        if (ivf := _is_ivf(self.index)) is None:
            raise ConfigError(explain("nprobe applies to IVF indexes only", got=self.factory,
                                      fix="leave nprobe unset for this index"))
        ivf.nprobe = min(nprobe, ivf.nlist)
        self.nprobe = int(ivf.nprobe)

    def ids_of_row(self, row: int) -> list[str]:
        """Every image id stored in bank row ``row`` (duplicates share a row)."""
        if self._ids_of_row is None:
            self._ids_of_row = [[] for _ in range(len(self))]
            for image_id, r in zip(self.ids, self._rows):
                self._ids_of_row[r].append(image_id)
        return self._ids_of_row[row]

    def memory_bytes(self) -> int:
        """Bytes of the serialised index (what it takes in memory, to within FAISS's small headers)."""
        return int(_faiss().serialize_index(self.index).nbytes)

    def search(self, query: Tensor, k: int, *, exclude_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The k best rows per query, best first, as :func:`cir_plugins.metrics.topk_rows`.

        Args:
            query: (Q, D) float, L2-normalised like the bank rows (any device; searched on the CPU).
            k: rows per query, 1..len(self).
            exclude_rows: optional (Q, K) int64, -1 padded: rows never returned.
        Returns:
            (scores (Q, k) float32, rows (Q, k) int64) on the CPU; where fewer than k rows remain
            (exclusions, or an IVF search that visited too few lists), the tail is -inf / -1.
        """
        if not torch.is_tensor(query) or query.dim() != 2 or query.shape[1] != self.dim:
            raise ShapeError(explain("query must be (Q, D) with the index's D",
                                     got=getattr(query, "shape", type(query)), expected=f"(Q, {self.dim})"))
        n = len(self)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
            raise ConfigError(explain("k must be a positive int no larger than the index", got=k, expected=f"1..{n}"))
        q = query.detach().to("cpu", torch.float32).contiguous().numpy()
        extra = 0
        if exclude_rows is not None:  # the metrics' own check: (Q, K) int64, -1 padded, rows in [0, n)
            settle(check_rows("exclude_rows", exclude_rows, q.shape[0], n, getattr(exclude_rows, "device", None),
                              padded=True))
            extra = int(exclude_rows.shape[1])
        scores, rows = self.index.search(q, min(n, k + extra))  # (Q, k + K) each, best first; -1 rows where none
        scores = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
        rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        scores = scores.masked_fill(rows < 0, float("-inf"))
        if exclude_rows is not None:
            ex = exclude_rows.to("cpu", torch.int64)
            hit = (rows[:, :, None] == ex[:, None, :]) & (ex[:, None, :] >= 0)  # (Q, k+K, K)
            dropped = hit.any(dim=2) | (rows < 0)  # (Q, k+K)
            order = torch.argsort(dropped.to(torch.int8), dim=1, stable=True)  # kept rows first, in their order
            rows, scores, dropped = rows.gather(1, order), scores.gather(1, order), dropped.gather(1, order)
            rows, scores = rows.masked_fill(dropped, -1), scores.masked_fill(dropped, float("-inf"))
        pad = (0, k - min(k, rows.shape[1]))  # an IVF search may return fewer than k columns
        return F.pad(scores[:, :k], pad, value=float("-inf")), F.pad(rows[:, :k], pad, value=-1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (FAISS binary, atomically) and ``path.json`` (metadata, atomically)."""
        path, data = Path(path), _faiss().serialize_index(self.index).tobytes()
        meta = {"format": FORMAT, "version": VERSION, "kind": self.kind, "factory": self.factory, "dim": self.dim,
                "rows": len(self), "nprobe": self.nprobe, "fingerprint": self.fingerprint,
                "bank_checksum": self.bank_checksum, "recall": self.recall, "ids": self.ids, "id_rows": self._rows}
        meta["index_digest"] = _digest(data, meta)
        atomic_write_bytes(path, data)
        atomic_write_json(path.with_name(path.name + ".json"), meta)
        logger.info("saved %r to %s", self, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FaissIndex:
        """Read an index written by :meth:`save`; DataError naming the file (and the entry) when it is missing,
        edited or malformed. Check it against the bank it is used with: :meth:`check_bank`."""
        faiss, path = _faiss(), Path(path)
        meta_path = path.with_name(path.name + ".json")
        if not path.is_file() or not meta_path.is_file():
            raise DataError(explain("no FAISS index (and its .json metadata) at this path", got=str(path),
                                    fix="export one with build_faiss_index(bank).save(path) or "
                                        "cir-plugins serve --faiss-export"))
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise DataError(explain("the FAISS index metadata is not readable JSON", got=f"{meta_path}: {error}",
                                    fix="export the index again")) from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(explain("the metadata file is not a cir_plugins FAISS index", got=str(meta_path),
                                    expected=FORMAT))
        if meta.get("version") != VERSION:
            raise DataError(explain("this FAISS index was written by another version of cir_plugins",
                                    got=f"version {meta.get('version')!r}", expected=VERSION,
                                    fix="export the index again from its bank"))
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DataError(explain("the FAISS index file cannot be read", got=f"{path}: {error}",
                                    fix="export the index again")) from error
        if _digest(data, meta) != meta.get("index_digest"):
            raise DataError(explain("the FAISS index and its metadata do not match their digest (one of the two "
                                    "files was edited, or they come from different exports)", got=str(path),
                                    fix="export the index again from its bank"))
        meta = _checked_meta(meta, meta_path)
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as error:
            raise DataError(explain("FAISS cannot read this index file", got=f"{path}: {str(error).strip()[-200:]}",
                                    fix="export the index again")) from error
        if int(index.ntotal) != meta["rows"] or int(index.d) != meta["dim"]:
            raise DataError(explain("the FAISS index disagrees with its metadata", expected=(meta["rows"], meta["dim"]),
                                    got=(int(index.ntotal), int(index.d)), fix="export the index again"))
        return cls(index, kind=meta["kind"], factory=meta["factory"], ids=meta["ids"], rows=meta["id_rows"],
                   fingerprint=meta["fingerprint"], bank_checksum=meta["bank_checksum"], nprobe=meta.get("nprobe"),
                   recall=meta.get("recall"))


def _default_ivfpq(n: int, dim: int, nlist: int | None, m: int | None, nbits: int) -> str:
    """The IVF-PQ factory string for n rows of dim, defaults filled in (see :func:`build_faiss_index`)."""
    if nlist is None:  # ~4 sqrt(N) lists (FAISS's usual advice), at most 4096 and at least 39 training rows a list
        nlist = int(max(1, min(4096, round(4 * n ** 0.5), n // 39)))
    if m is None:  # 4-bit codes: D/4 sub-quantizers (D/8 bytes a row); 8-bit: D/8 (D/8 bytes a row)
        m = next(c for c in (dim // (4 if nbits == 4 else 8), 32, 16, 8, 4, 2) if c >= 1 and dim % c == 0)
    if dim % m:
        raise ConfigError(explain("the PQ sub-quantizer count m must divide the embedding dim", got=(m, dim),
                                  fix=f"pick m among the divisors of {dim}"))
    if nbits == 4 and m % 2:
        raise ConfigError(explain("4-bit (fast-scan) PQ needs an even sub-quantizer count m", got=m,
                                  fix="pick an even m dividing the dim, or nbits=8"))
    return f"IVF{nlist},PQ{m}x4fs" if nbits == 4 else f"IVF{nlist},PQ{m}x{nbits}"


def build_faiss_index(bank: Any, kind: str = "auto", *, factory: str | None = None, nlist: int | None = None,
                      m: int | None = None, nbits: int = 4, nprobe: int = 32, train_size: int = 65536,
                      seed: int = 0, recall_queries: int = RECALL_QUERIES) -> FaissIndex:
    """Export a single-vector bank (``NegativeBank`` or anything with ``embeddings`` (N, D), ``ids``, ``row_of``,
    ``fingerprint``) to a FAISS index.

    Args:
        kind: "auto", "flat" or "ivfpq" (module doc).
        factory: a FAISS factory string used instead of ``kind``'s (inner-product metric), e.g.
            "OPQ32,IVF1024,PQ32" or "HNSW32,PQ32"; ``kind`` then only names it in the metadata.
        nlist, m, nbits: IVF clusters (default ~4 sqrt(N), at most 4096 and N / 39), PQ codes a row (default D/4
            for 4-bit codes, D/8 for 8-bit ones: D/8 bytes a row either way), bits per code (default 4: FAISS's
            fast-scan PQ, much faster than 8-bit codes on a CPU).
        nprobe: lists visited per search (IVF only).
        train_size: rows sampled (seeded) to train the quantizers; at least 39 * nlist is advised.
        recall_queries: bank rows searched to measure an approximate index's recall@10 against exact search
            (logged, kept in ``index.recall``); 0 skips the measurement.
    """
    faiss = _faiss()
    if kind not in KINDS:
        raise ConfigError(explain("unknown FAISS index kind", got=kind, expected=KINDS,
                                  fix="pass 'auto', 'flat' (exact) or 'ivfpq' (compressed), or a factory= string"))
    embeddings = getattr(bank, "embeddings", None)
    if not torch.is_tensor(embeddings) or embeddings.dim() != 2:
        raise ConfigError(explain("FAISS export needs a single-vector bank (N, D)",
                                  got=getattr(embeddings, "shape", type(embeddings).__name__),
                                  fix="multi-vector (max_token) banks are searched exactly with metrics.topk_rows"))
    check_positive_int("recall_queries", recall_queries, minimum=0)
    n, dim = embeddings.shape
    if kind == "auto":
        kind = "flat" if n < FLAT_BELOW else "ivfpq"
    x = embeddings.detach().to("cpu", torch.float32).contiguous().numpy()  # (N, D) float32, a view when possible
    if factory is None:
        factory = "Flat" if kind == "flat" else _default_ivfpq(n, dim, nlist, m, nbits)
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ConfigError(explain("FAISS does not understand this factory string", got=factory,
                                  fix="see the FAISS wiki's index factory page, e.g. 'IVF1024,PQ32'")) from error
    if not index.is_trained:
        sample = x if n <= train_size else x[np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False))]
        try:
            index.train(np.ascontiguousarray(sample))
        except RuntimeError as error:  # e.g. fewer training rows than clusters
            raise ConfigError(explain(f"FAISS could not train {factory!r} on {len(sample)} rows",
                                      got=str(error).strip().splitlines()[-1],
                                      fix="use fewer lists (nlist) or codes (nbits), or kind='flat'")) from error
    index.add(x)
    ids = list(bank.ids)
    result = FaissIndex(index, kind=kind, factory=factory, ids=ids, rows=[bank.row_of(i) for i in ids],
                        fingerprint=bank.fingerprint, bank_checksum=bank_checksum(bank))
    if _is_ivf(index) is not None:
        result.set_nprobe(nprobe)
    if factory != "Flat" and recall_queries:
        measured = result.measure_recall(embeddings, queries=recall_queries, seed=seed)
        logger.info("%s on %d rows: recall@%d %.3f against exact search (%d bank rows as queries, nprobe %s)",
                    factory, n, measured["k"], measured["recall"], measured["queries"], measured["nprobe"])
    logger.info("built %r from a bank of %d rows", result, n)
    return result
