"""A negative bank exported to a FAISS index, for large galleries searched on a CPU.

Two kinds (optional dependency: ``pip install "cir-plugins[faiss]"``, the ``faiss-cpu`` wheel):

- ``"flat"``: ``IndexFlatIP``, exact inner product over every row; its results equal
  :func:`cir_plugins.metrics.topk_rows` (the bank rows are L2-normalised, so inner product is cosine).
  Memory: N x D x 4 bytes.
- ``"ivfpq"``: ``IVF{nlist},PQ{m}x4fs`` (or ``x{nbits}``) with inner product: the rows are clustered
  into ``nlist`` lists and each row is stored as ``m`` codes of ``nbits`` bits (``m * nbits / 8`` bytes a
  row instead of ``4 D``; default D/8 bytes); a search visits ``nprobe`` lists. Approximate: benchmarks/faiss_index.py measures its
  recall@50 against exact search on a 1M-row bank. Any other FAISS factory string (e.g.
  ``"OPQ32,IVF1024,PQ32"`` or ``"HNSW32,PQ32"``) is accepted with ``factory=``.

Only single-vector (``"dot"``) banks export; a multi-vector (``"max_token"``) bank raises ConfigError.

Files (:meth:`FaissIndex.save` / :meth:`FaissIndex.load`): ``PATH`` holds the index in FAISS's own
binary format (``faiss.serialize_index``; a documented binary layout read by ``faiss.deserialize_index``,
not a pickle: nothing executes on load), written atomically; ``PATH.json`` holds the metadata: format,
kind, factory string, dim, rows, the bank's fingerprint and ids/rows (so the index alone maps results
back to image ids), nprobe, and the blake2b digest of the index bytes (checked on load).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .._atomic import atomic_write_bytes, atomic_write_json
from ..checks import check_rows, settle
from ..errors import ConfigError, DataError, ShapeError, explain

__all__ = ["FaissIndex", "build_faiss_index", "faiss_available", "KINDS"]

logger = logging.getLogger(__name__)

FORMAT = "cir_plugins.faiss_index"
VERSION = "1"
KINDS = ("flat", "ivfpq")


def faiss_available() -> bool:
    """True when the ``faiss`` module imports (``pip install "cir-plugins[faiss]"``)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise ConfigError(explain("FAISS is not installed", got="import faiss failed",
                                  fix='pip install "cir-plugins[faiss]" (the faiss-cpu wheel)')) from error
    return faiss


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


class FaissIndex:
    """A FAISS index over a bank's rows, plus the bank's id -> row map.

    Build with :func:`build_faiss_index`, persist with :meth:`save` / :meth:`load`, query with
    :meth:`search` (same contract as :func:`cir_plugins.metrics.topk_rows`).
    """

    def __init__(self, index: Any, *, kind: str, factory: str, ids: Sequence[str], rows: Sequence[int],
                 fingerprint: str, nprobe: int | None = None) -> None:
        self.index = index
        self.kind, self.factory = kind, factory
        self.ids, self._rows = list(ids), [int(r) for r in rows]
        self._row_of = dict(zip(self.ids, self._rows))  # id -> row, as NegativeBank's (exclusion_rows reads it)
        self.fingerprint = str(fingerprint)
        self._ids_of_row: list[list[str]] | None = None
        self.nprobe = None
        if nprobe is not None:
            self.set_nprobe(nprobe)

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
        return f"FaissIndex(kind={self.kind!r}, factory={self.factory!r}, rows={len(self)}, dim={self.dim}{probe})"

    def set_nprobe(self, nprobe: int) -> None:
        """Lists visited per query (IVF indexes only; more = slower and closer to exact)."""
        faiss = _faiss()
        if not isinstance(nprobe, int) or isinstance(nprobe, bool) or nprobe < 1:
            raise ConfigError(explain("nprobe must be a positive int", got=nprobe, fix="e.g. nprobe=32"))
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError as error:
            raise ConfigError(explain("nprobe applies to IVF indexes only", got=self.factory,
                                      fix="leave nprobe unset for this index")) from error
        ivf.nprobe = min(nprobe, ivf.nlist)
        self.nprobe = int(ivf.nprobe)

    def ids_of_row(self, row: int) -> list[str]:
        """Every image id stored in bank row ``row`` (duplicates share a row)."""
        if self._ids_of_row is None:
            table: list[list[str]] = [[] for _ in range(len(self))]
            for image_id, r in zip(self.ids, self._rows):
                table[r].append(image_id)
            self._ids_of_row = table
        return self._ids_of_row[row]

    def memory_bytes(self) -> int:
        """Bytes of the serialised index (what it takes in memory, to within FAISS's small headers)."""
        return int(_faiss().serialize_index(self.index).nbytes)

    # ----------------------------------------------------------------------------------------- search
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
            raise ShapeError(explain("query must be (Q, D) with the index's D", got=getattr(query, "shape", type(query)),
                                     expected=f"(Q, {self.dim})"))
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
            # stable reorder: kept rows first in their order, dropped ones after (then cut to k)
            order = torch.argsort(dropped.to(torch.int8), dim=1, stable=True)
            rows, scores, dropped = rows.gather(1, order), scores.gather(1, order), dropped.gather(1, order)
            rows = rows.masked_fill(dropped, -1)
            scores = scores.masked_fill(dropped, float("-inf"))
        out_scores = torch.full((q.shape[0], k), float("-inf"))
        out_rows = torch.full((q.shape[0], k), -1, dtype=torch.int64)
        width = min(k, rows.shape[1])
        out_scores[:, :width], out_rows[:, :width] = scores[:, :width], rows[:, :width]
        return out_scores, out_rows

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (FAISS binary, atomically) and ``path.json`` (metadata, atomically)."""
        path = Path(path)
        data = _faiss().serialize_index(self.index).tobytes()
        atomic_write_bytes(path, data)
        meta = {"format": FORMAT, "version": VERSION, "kind": self.kind, "factory": self.factory, "dim": self.dim,
                "rows": len(self), "nprobe": self.nprobe, "fingerprint": self.fingerprint,
                "index_digest": _digest(data), "ids": self.ids, "id_rows": self._rows}
        atomic_write_json(path.with_name(path.name + ".json"), meta)
        logger.info("saved %r to %s", self, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaissIndex":
        """Read an index written by :meth:`save`; DataError naming the file when it is missing or does not match."""
        faiss = _faiss()
        path = Path(path)
        meta_path = path.with_name(path.name + ".json")
        if not path.is_file() or not meta_path.is_file():
            raise DataError(explain("no FAISS index (and its .json metadata) at this path", got=str(path),
                                    fix="export one with build_faiss_index(bank).save(path) or "
                                        "cir-plugins serve --faiss-export"))
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(explain("the FAISS index metadata is not readable JSON", got=f"{meta_path}: {error}",
                                    fix="export the index again")) from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(explain("the metadata file is not a cir_plugins FAISS index", got=str(meta_path),
                                    expected=FORMAT))
        data = path.read_bytes()
        if _digest(data) != meta.get("index_digest"):
            raise DataError(explain("the FAISS index file does not match its metadata (digest differs)", got=str(path),
                                    fix="export the index again; the two files were written by different exports"))
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if int(index.ntotal) != meta["rows"] or int(index.d) != meta["dim"]:
            raise DataError(explain("the FAISS index disagrees with its metadata", got=(int(index.ntotal), int(index.d)),
                                    expected=(meta["rows"], meta["dim"]), fix="export the index again"))
        return cls(index, kind=meta["kind"], factory=meta["factory"], ids=meta["ids"], rows=meta["id_rows"],
                   fingerprint=meta["fingerprint"], nprobe=meta.get("nprobe"))


def _default_ivfpq(n: int, dim: int, nlist: int | None, m: int | None, nbits: int) -> str:
    if nlist is None:
        nlist = int(max(1, min(4096, round(4 * n ** 0.5))))  # ~4 sqrt(N) lists, FAISS's usual advice
    if m is None:  # 4-bit codes: D/4 sub-quantizers (D/8 bytes a row); 8-bit: D/8 (D/8 bytes a row)
        m = next(c for c in (dim // (4 if nbits == 4 else 8), 32, 16, 8, 4, 2) if c >= 1 and dim % c == 0)
    if dim % m:
        raise ConfigError(explain("the PQ sub-quantizer count m must divide the embedding dim", got=(m, dim),
                                  fix=f"pick m among the divisors of {dim}"))
    if nbits == 4:
        if m % 2:
            raise ConfigError(explain("4-bit (fast-scan) PQ needs an even sub-quantizer count m", got=m,
                                      fix="pick an even m dividing the dim, or nbits=8"))
        return f"IVF{nlist},PQ{m}x4fs"
    return f"IVF{nlist},PQ{m}x{nbits}"


def build_faiss_index(bank: Any, kind: str = "flat", *, factory: str | None = None, nlist: int | None = None,
                      m: int | None = None, nbits: int = 4, nprobe: int = 32, train_size: int = 65536,
                      seed: int = 0) -> FaissIndex:
    """Export a single-vector bank (``NegativeBank`` or anything with ``embeddings`` (N, D), ``ids``,
    ``row_of``, ``fingerprint``) to a FAISS index.

    Args:
        kind: "flat" (exact ``IndexFlatIP``) or "ivfpq" (compressed, approximate).
        factory: a FAISS factory string used instead of ``kind``'s (inner-product metric), e.g.
            "OPQ32,IVF1024,PQ32"; ``kind`` then only names it in the metadata.
        nlist, m, nbits: IVF lists (default ~4 sqrt(N), at most 4096), PQ sub-quantizers (default D/4
            for 4-bit codes, D/8 for 8-bit ones: D/8 bytes a row either way) and bits per code (default 4:
            FAISS's fast-scan PQ, which trains and searches much faster than 8-bit codes on a CPU).
        nprobe: lists visited per search (IVF only).
        train_size: rows sampled (seeded) to train the quantizers; at least 39 * nlist is advised.
    """
    faiss = _faiss()
    if kind not in KINDS:
        raise ConfigError(explain("unknown FAISS index kind", got=kind, expected=KINDS,
                                  fix="pass 'flat' (exact) or 'ivfpq' (compressed), or a factory= string"))
    embeddings = getattr(bank, "embeddings", None)
    if not torch.is_tensor(embeddings) or embeddings.dim() != 2:
        raise ConfigError(explain("FAISS export needs a single-vector bank (N, D)",
                                  got=getattr(embeddings, "shape", type(embeddings).__name__),
                                  fix="multi-vector (max_token) banks are searched exactly with metrics.topk_rows"))
    n, dim = embeddings.shape
    x = embeddings.detach().to("cpu", torch.float32).contiguous().numpy()  # (N, D) float32, a view when possible
    if factory is None:
        factory = "Flat" if kind == "flat" else _default_ivfpq(n, dim, nlist, m, nbits)
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ConfigError(explain("FAISS does not understand this factory string", got=factory,
                                  fix="see the FAISS wiki's index factory page, e.g. 'IVF1024,PQ32'")) from error
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = x if n <= train_size else x[np.sort(rng.choice(n, size=train_size, replace=False))]
        try:
            index.train(np.ascontiguousarray(sample))
        except RuntimeError as error:  # e.g. fewer training rows than clusters
            raise ConfigError(explain(f"FAISS could not train {factory!r} on {len(sample)} rows",
                                      got=str(error).strip().splitlines()[-1],
                                      fix="use fewer lists (nlist) or codes (nbits), or kind='flat' for a small "
                                          "bank")) from error
    index.add(x)
    ids = list(bank.ids)
    rows = [bank.row_of(i) for i in ids]
    is_ivf = True
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        is_ivf = False
    result = FaissIndex(index, kind=kind, factory=factory, ids=ids, rows=rows, fingerprint=bank.fingerprint,
                        nprobe=nprobe if is_ivf else None)
    logger.info("built %r from a bank of %d rows", result, n)
    return result
