"""The negative bank's on-disk side: its file format, the checks every stored row passes, and the shard cache.

A bank file (:meth:`NegativeBank.save <cir_plugins.negatives.bank.NegativeBank.save>`) is one safetensors file with
one tensor ``embeddings`` ((N, D) or (N, T, D)) and string metadata: ``format``, ``version``, ``ids`` (JSON list of
every covered id), ``rows`` (JSON list, the row of each id), ``dtype``, ``similarity``, ``shape`` (JSON list),
``fingerprint``, optionally ``preprocessing`` (:func:`bank_preprocessing`), and the checksums of
:func:`checksummed_metadata`: ``checksum`` (SHA-256 over the tensor's bytes and every other entry), ``block_rows``,
``block_checksums`` (SHA-256 of each block of rows) and ``header_checksum`` (every entry but the two checksums), so
that a reader of rows ``[start, stop)`` verifies the header and the blocks it touches only. :func:`read_bank_file`
refuses a file that fails its checksum, lacks a key, or has a row off unit length (:data:`UNIT_TOLERANCE`; a
multi-vector row's tokens are each unit length or all-zero padding, one real at least), as a build does; a file
without block checksums read in part is verified whole, streamed, with a warning to re-save it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from .._atomic import atomic_write_bytes
from .._utils import shard_rows
from ..checks import dtype_from_name, dtype_name
from ..errors import ConfigError, DataError, explain

__all__ = ["FORMAT", "VERSION", "UNIT_TOLERANCE", "BLOCK_ROWS", "BANK_DTYPES", "read_bank_file",
           "read_bank_header", "bank_preprocessing", "checksummed_metadata", "checksum", "check_unit_rows",
           "resolve_bank_dtype", "ShardCache"]

logger = logging.getLogger(__name__)

FORMAT = "cir_plugins.bank"
VERSION = "2"  # 2: metadata holds a checksum (version-1 files load with a warning)
#: largest allowed | ||row|| - 1 | of a bank row, by dtype (rows are normalised in float32, then cast)
UNIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
_REQUIRED_META = ("format", "version", "ids", "rows", "dtype", "similarity", "shape", "fingerprint")
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors' dtype names
#: rows per block checksum written by :func:`checksummed_metadata` (recorded in each file as ``block_rows``)
BLOCK_ROWS = 4096
_BLOCK_KEYS = ("block_rows", "block_checksums", "header_checksum")


def resolve_bank_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """A bank's dtype from a name or torch dtype; None = bf16 on CUDA, float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_from_name(dtype, allowed=BANK_DTYPES, what="bank dtype")


def _feed(digest: Any, tensor: Tensor) -> Any:
    """``digest`` updated with ``tensor``'s bytes as stored, in chunks (no second copy of a large bank)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    for start in range(0, flat.numel(), 1 << 24):
        digest.update(flat[start:start + (1 << 24)].view(torch.uint8).numpy())  # a view: no copy of the bytes
    return digest


def _meta_digest(meta: Mapping[str, str], leave_out: Sequence[str] = ("checksum",)) -> Any:
    return hashlib.sha256(json.dumps({k: v for k, v in sorted(meta.items()) if k not in leave_out}).encode())


def checksum(embeddings: Tensor, meta: Mapping[str, str]) -> str:
    """SHA-256 over the metadata entries (but ``checksum``) and the embeddings' bytes, as stored."""
    return _feed(_meta_digest(meta), embeddings).hexdigest()


def _file_checksum(path: Path, meta: Mapping[str, str]) -> str:
    """:func:`checksum` of a bank file, streamed in 16 MiB reads (a one-tensor file's data is the tensor's bytes)."""
    digest = _meta_digest(meta)
    with open(path, "rb") as handle:
        handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checksummed_metadata(embeddings: Tensor, meta: Mapping[str, str], *,
                         block_rows: int = BLOCK_ROWS) -> dict[str, str]:
    """``meta`` with the module doc's checksums (re)computed over ``embeddings``, ``block_rows`` a block."""
    meta = {k: v for k, v in meta.items() if k not in (*_BLOCK_KEYS, "checksum")} | {"block_rows": str(block_rows)}
    meta["block_checksums"] = json.dumps([_feed(hashlib.sha256(), embeddings[s:s + block_rows]).hexdigest()
                                          for s in range(0, embeddings.shape[0], block_rows)])
    meta["header_checksum"] = _meta_digest(meta, ("checksum", "header_checksum")).hexdigest()
    meta["checksum"] = checksum(embeddings, meta)
    return meta


def check_unit_rows(embeddings: Tensor, where: str, ids_of_rows: Mapping[int, str] | Sequence[str] = ()) -> None:
    """DataError unless every row (dot) or token (max_token: or all-zero padding, one real token at least) is unit
    length within UNIT_TOLERANCE; names the rows, and their image ids when ``ids_of_rows`` (row -> id) is given."""
    tolerance = UNIT_TOLERANCE.get(embeddings.dtype, 1e-3)
    bad: list[int] = []
    for start in range(0, embeddings.shape[0], 65536):
        norms = embeddings[start:start + 65536].float().norm(dim=-1)  # (n,) or (n, T)
        if norms.dim() == 1:
            wrong = ~((norms - 1).abs() <= tolerance)
        else:
            token_ok = ((norms - 1).abs() <= tolerance) | (norms == 0)
            wrong = ~token_ok.all(dim=1) | (norms == 0).all(dim=1)
        bad.extend((wrong.nonzero().flatten() + start).tolist()[:10 - len(bad)])
        if len(bad) >= 10:
            break
    if bad:
        row = embeddings[bad[0]].float().norm(dim=-1)
        named = [ids_of_rows[r] for r in bad if r < len(ids_of_rows)] if isinstance(ids_of_rows, Sequence) \
            else [ids_of_rows[r] for r in bad if r in ids_of_rows]
        raise DataError(explain(f"{where}: bank rows are not unit length (the library L2-normalises every row)",
                                got=f"rows {bad[:10]}" + (f" (images {named})" if named else "")
                                    + f", e.g. row {bad[0]} has norm {row.tolist()}",
                                expected=f"norm 1 within {tolerance} for {embeddings.dtype}",
                                fix="rebuild the bank (cir-plugins build-bank); do not edit its embeddings"))


def _span(n: int, span: Any, shard: Any) -> tuple[int, int] | None:
    """Rows [start, stop) to read of an ``n``-row bank, or None for all; ConfigError on bad bounds."""
    if span is not None and shard is not None:
        raise ConfigError(explain("pass span=(start, stop) or shard=(rank, world), not both", got=(span, shard)))
    if shard is not None:
        if not (isinstance(shard, (tuple, list)) and len(shard) == 2):
            raise ConfigError(explain("shard must be (rank, world)", got=shard, fix="pass (rank, world_size)"))
        return shard_rows(n, *shard)
    if span is None:
        return None
    if not (isinstance(span, (tuple, list)) and len(span) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span) and 0 <= span[0] <= span[1] <= n):
        raise ConfigError(explain("span must be (start, stop) ints with 0 <= start <= stop <= the bank's rows",
                                  got=span, expected=f"0 <= start <= stop <= {n}",
                                  fix="pass shard=(rank, world) for a rank's share"))
    return int(span[0]), int(span[1])


def _corrupt(path: Path, what: str, got: Any) -> DataError:
    return DataError(explain(f"{path}: the bank does not match its checksum ({what})", got=got,
                             fix="rebuild the bank, or copy the file again"))


def read_bank_file(path: str | os.PathLike, *, span: tuple[int, int] | None = None,
                   shard: tuple[int, int] | None = None) -> tuple[Tensor, list[str], list[int], dict[str, str]]:
    """(embeddings on the CPU, ids, rows, metadata) of a bank file that passes every check of the module doc, else
    DataError naming the file and the fault (ConfigError on bad bounds).

    ``span=(start, stop)`` reads only rows [start, stop), ``shard=(rank, world)`` the rank's rows
    ``shard_rows(N, rank, world)``, N = ``json.loads(meta["shape"])[0]``: the embeddings are those rows alone, while
    ``ids`` and ``rows`` stay the whole bank's (a query's target may sit in another rank's slice)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(explain("no negative bank at this path", got=str(path),
                                fix="build one with NegativeBank.build(...).save(path) or cir-plugins build-bank"))
    try:
        with safe_open(str(path), framework="pt") as handle:  # checked on the CPU, then moved
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT or "embeddings" not in handle.keys():
                raise DataError(explain("the file is not a cir_plugins negative bank", got=meta.get("format"),
                                        expected=FORMAT))
            stored = handle.get_slice("embeddings")
            shape, dtype = list(stored.get_shape()), _STORED.get(stored.get_dtype(), stored.get_dtype())
            bounds = _span(shape[0] if shape else 0, span, shard)
            missing = [key for key in _REQUIRED_META if key not in meta]
            if missing:
                raise DataError(explain(f"{path}: the bank metadata lacks required keys", got=missing,
                                        expected=list(_REQUIRED_META), fix="rebuild the bank")) from None
            embeddings, blocks = (handle.get_tensor("embeddings") if bounds is None else None), None
            if bounds is not None and any(key in meta for key in _BLOCK_KEYS):
                blocks = _block_checksums(path, meta, shape[0])
            elif "checksum" not in meta:
                logger.warning("%s was written before banks carried a checksum: its content cannot be verified; "
                               "re-save it (NegativeBank.load(path).save(path))", path)
            else:
                if bounds is not None:
                    logger.warning("%s has no block checksums: verifying the whole file to read rows %s (re-save "
                                   "it to verify only the rows read: NegativeBank.load(path).save(path))", path,
                                   list(bounds))
                if (checksum(embeddings, meta) if bounds is None else _file_checksum(path, meta)) != meta["checksum"]:
                    raise _corrupt(path, "edited or corrupt: a changed row, id or metadata entry",
                                   meta["checksum"][:16])
            ids, rows, shape_meta = _parse(path, meta)
            if shape != shape_meta or dtype != meta.get("dtype"):
                raise DataError(explain("the bank tensor disagrees with its metadata", got=(shape, dtype),
                                        expected=(shape_meta, meta.get("dtype")), fix="rebuild the bank"))
            if bounds is not None:
                embeddings = _read_rows(path, stored, bounds, blocks, shape[0])
    except (DataError, ConfigError):
        raise
    except Exception as error:  # safetensors raises its own error types on corrupt files
        raise DataError(explain("the bank file is not a readable safetensors file", got=f"{path}: {error}",
                                fix="rebuild the bank")) from error
    start, stop = bounds if bounds is not None else (0, shape[0])
    check_unit_rows(embeddings, str(path) + (f" (rows counted from row {start})" if start else ""),
                     {r - start: i for i, r in reversed(list(zip(ids, rows))) if start <= r < stop})
    return embeddings, ids, rows, meta


def _block_checksums(path: Path, meta: Mapping[str, str], n: int) -> tuple[int, list[str]]:
    """(rows per block, SHA-256 of each block) of a file with block checksums, once its header is verified."""
    if not all(key in meta for key in _BLOCK_KEYS) \
            or _meta_digest(meta, ("checksum", "header_checksum")).hexdigest() != meta["header_checksum"]:
        raise _corrupt(path, "its header: an edited id, row or metadata entry", meta.get("header_checksum", "")[:16])
    try:
        block_rows, checksums = int(meta["block_rows"]), json.loads(meta["block_checksums"])
    except ValueError as error:
        raise _corrupt(path, "unreadable block checksums", str(error)) from error
    if block_rows < 1 or not isinstance(checksums, list) or len(checksums) != -(-n // block_rows):
        raise _corrupt(path, "block checksums that do not cover its rows", (block_rows, n))
    return block_rows, checksums


def _read_rows(path: Path, stored: Any, bounds: tuple[int, int], blocks: tuple[int, list[str]] | None,
               n: int) -> Tensor:
    """Rows [start, stop) through safetensors' slice access; with ``blocks``, each block touched is checked first."""
    start, stop = bounds
    if blocks is None or start == stop:
        return stored[start:stop]
    size, checksums = blocks
    lo, hi = start // size * size, min(-(-stop // size) * size, n)
    part = stored[lo:hi]  # (hi - lo, ...) the touched blocks, nothing else
    for first in range(lo, hi, size):
        if _feed(hashlib.sha256(), part[first - lo:first - lo + size]).hexdigest() != checksums[first // size]:
            raise _corrupt(path, f"block {first // size}, rows {first}..{min(first + size, n) - 1}: a changed row",
                           checksums[first // size][:16])
    return part[start - lo:stop - lo]


def _parse(path: Path, meta: Mapping[str, str]) -> tuple[list[str], list[int], list]:
    """(ids, rows, shape) from the metadata, DataError when they are not JSON of the right types."""
    try:
        ids, rows, shape = (json.loads(meta[key]) for key in ("ids", "rows", "shape"))
    except (ValueError, RecursionError) as error:
        raise DataError(explain(f"{path}: the bank metadata is corrupt", got=f"{type(error).__name__}: {error}",
                                fix="rebuild the bank")) from error
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)
            and isinstance(rows, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
            and isinstance(shape, list)):
        raise DataError(explain("the bank metadata has the wrong types",
                                got=f"ids {type(ids).__name__}, rows {type(rows).__name__}, "
                                    f"shape {type(shape).__name__} in {path}",
                                expected="ids: list of strings, rows: list of ints, shape: list",
                                fix="rebuild the bank"))
    return ids, rows, shape


def read_bank_header(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of the bank file at ``path``, header only (nothing verified); DataError if not a bank."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as error:  # a missing file, or safetensors' own error types on a corrupt one
        raise DataError(explain("cannot read the bank file", got=f"{path}: {error}",
                                fix="build one with cir-plugins build-bank (NegativeBank.build(...).save(path))")) \
            from error
    if meta.get("format") != FORMAT:
        raise DataError(explain("the file is not a cir_plugins negative bank", got=f"{path}: {meta.get('format')}",
                                expected=FORMAT))
    return meta


def bank_preprocessing(meta: Mapping[str, str], path: str | os.PathLike) -> dict[str, Any] | None:
    """The images' preprocessing a bank records (an image store's ``preprocessing()``: ``kind``, ``size``,
    normalisation), or None (logged) when it records none; DataError when the entry is not a JSON object."""
    text = meta.get("preprocessing")
    if text is None:
        logger.info("%s does not record its images' preprocessing (built from a plain mapping, or before banks "
                    "recorded it): the preprocessing of the commands that use it cannot be checked", path)
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        value = error
    if not isinstance(value, dict):
        raise DataError(explain(f"{path}: the bank's preprocessing entry is not a JSON object", got=text[:80],
                                fix="rebuild the bank"))
    return value


class ShardCache:
    """Finished chunks of bank rows on disk, so a killed build resumes and encodes only the rest.

    Each shard ``rows-<first>-<count>-<key hash>.safetensors``, written atomically, holds ``rows`` (k,) and
    ``embeddings``; its metadata holds the key (:meth:`key`, everything that changes a row) as JSON, so shards made
    with another key are ignored, the log naming the entries that differ.
    """

    _NAME = re.compile(r"^rows-(\d+)-(\d+)-([0-9a-f]+)\.safetensors$")

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any]) -> None:
        self.folder, self.key, self.key_json = Path(folder), key, json.dumps(key, sort_keys=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ids_hash = hashlib.blake2b(self.key_json.encode(), digest_size=8).hexdigest()

    @staticmethod
    def key(representatives: Sequence[str], images: Mapping[str, Tensor], *, fingerprint: str, dtype: torch.dtype,
            similarity: str, device: torch.device) -> dict[str, Any]:
        """Everything that changes a bank row, JSON-ready: the weights' fingerprint, the ids (hashed), the dtype,
        the similarity, the device type, the images' preprocessing (an ImageStore's ``preprocessing()``) and their
        files' size and mtime; a plain mapping of tensors is keyed on its ids only."""
        describe = getattr(images, "preprocessing", None)
        preprocessing = describe() if callable(describe) else {"mapping": type(images).__name__}
        path_of = getattr(images, "path_of", None)
        stamps = hashlib.blake2b(digest_size=8)
        if callable(path_of):
            for image_id in representatives:
                try:
                    info = os.stat(path_of(image_id))
                    stamps.update(f"{image_id}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
                except (OSError, KeyError, ValueError):  # unreadable now: the build itself will say so
                    stamps.update(f"{image_id}\0?\n".encode())
        return {"fingerprint": fingerprint, "dtype": dtype_name(dtype), "similarity": similarity,
                "device": torch.device(device).type, "preprocessing": preprocessing,
                "ids": hashlib.blake2b("\n".join(representatives).encode(), digest_size=8).hexdigest(),
                "files": stamps.hexdigest() if callable(path_of) else None}

    def load(self, device: torch.device) -> dict[int, Tensor]:
        done: dict[int, Tensor] = {}
        for path in sorted(self.folder.iterdir()):
            if not self._NAME.match(path.name):
                continue
            try:
                with safe_open(str(path), framework="pt") as handle:
                    meta = handle.metadata() or {}
                if meta.get("key") != self.key_json:
                    try:
                        theirs = json.loads(meta.get("key", "{}"))
                    except ValueError:
                        theirs = {}
                    differ = sorted(k for k in self.key if not isinstance(theirs, dict) or theirs.get(k) != self.key[k])
                    logger.warning("ignoring bank shard %s: made with other %s", path, ", ".join(differ) or "settings")
                    continue
                tensors = load_file(str(path), device=str(device))
            except Exception as error:  # a torn file cannot exist (atomic writes) but a foreign one may
                logger.warning("ignoring unreadable bank shard %s: %s", path, error)
                continue
            done.update(zip(tensors["rows"].tolist(), tensors["embeddings"]))
        if done:
            logger.info("bank cache %s: %d rows already encoded", self.folder, len(done))
        return done

    def write(self, items: list[tuple[int, Tensor]]) -> None:
        if not items:
            return
        rows = torch.tensor([r for r, _ in items], dtype=torch.long)
        embeddings = torch.stack([e.detach().to("cpu") for _, e in items]).contiguous()
        atomic_write_bytes(self.folder / f"rows-{int(rows[0]):09d}-{len(items):06d}-{self.ids_hash}.safetensors",
                           save({"rows": rows, "embeddings": embeddings}, metadata={"key": self.key_json}))
