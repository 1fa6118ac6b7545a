"""The negative bank's on-disk side: its file format, the checks every stored row passes, and the shard cache.

A bank file (:meth:`NegativeBank.save <cir_plugins.negatives.bank.NegativeBank.save>`) is one safetensors
file with a single tensor ``embeddings`` ((N, D) or (N, T, D)) and string metadata: ``format``
("cir_plugins.bank"), ``version``, ``ids`` (JSON list of every covered id), ``rows`` (JSON list, the row of
each id, same order), ``dtype``, ``similarity``, ``shape`` (JSON list), ``fingerprint`` and ``checksum``
(SHA-256 over the tensor's bytes and every other metadata entry), and, when the images' preprocessing was known
at build time, ``preprocessing`` (JSON: the image store's description, see :func:`bank_preprocessing`).
:func:`read_bank_file` verifies the
checksum (a flipped bit or an edited id is refused), that every metadata key is there, and that every row
is unit length (:data:`UNIT_TOLERANCE`: ``| ||row|| - 1 |`` at most 1e-3 in float32, 1e-2 in bf16 / fp16; a
multi-vector row's tokens are each unit length or all-zero padding, at least one token real); a build
checks its rows the same way. :class:`_ShardCache` holds the finished chunks of a resumable
build. :mod:`cir_plugins.negatives.bank` re-exports the public names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from .._atomic import atomic_write_bytes
from ..errors import ConfigError, DataError, explain

__all__ = ["FORMAT", "VERSION", "UNIT_TOLERANCE", "read_bank_file", "bank_preprocessing", "read_bank_header"]

logger = logging.getLogger(__name__)

FORMAT = "cir_plugins.bank"
VERSION = "2"  # 2: metadata holds a checksum (version-1 files load with a warning)
#: largest allowed | ||row|| - 1 | of a bank row, by dtype (rows are normalised in float32, then cast)
UNIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
_REQUIRED_META = ("format", "version", "ids", "rows", "dtype", "similarity", "shape", "fingerprint")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(explain("unknown bank dtype", got=dtype, expected=sorted(_DTYPES)))
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ConfigError(explain("unsupported bank dtype", got=dtype, expected=sorted(_DTYPES)))
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def _checksum(embeddings: Tensor, meta: Mapping[str, str]) -> str:
    """SHA-256 over the metadata entries (but ``checksum``) and the embeddings' bytes, as stored."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in sorted(meta.items()) if k != "checksum"}).encode())
    flat = embeddings.detach().to("cpu").contiguous().reshape(-1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):  # chunks: no second full copy of a large bank
        digest.update(flat[start:start + step].view(torch.uint8).numpy())  # a view: no copy of the bytes
    return digest.hexdigest()


def _check_unit_rows(embeddings: Tensor, where: str, ids_of_rows: Mapping[int, str] | Sequence[str] = ()) -> None:
    """DataError unless every row is unit length (dot) or every token unit length or all-zero padding with at
    least one real token (max_token), within UNIT_TOLERANCE of the dtype; checked in chunks of rows. The error
    names the rows, and their image ids when ``ids_of_rows`` (row -> id) is given."""
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


def read_bank_file(path: str | os.PathLike) -> tuple[Tensor, list[str], list[int], dict[str, str]]:
    """(embeddings on the CPU, ids, rows, metadata) of a bank file that passes every check of the module doc.

    Raises DataError naming the file and what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(explain("no negative bank at this path", got=str(path),
                                fix="build one with NegativeBank.build(...).save(path) or cir-plugins build-bank"))
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path), device="cpu")  # checked on the CPU, then moved
    except Exception as error:  # safetensors raises its own error types on corrupt files
        raise DataError(explain("the bank file is not a readable safetensors file", got=f"{path}: {error}",
                                fix="rebuild the bank")) from error
    if meta.get("format") != FORMAT or "embeddings" not in tensors:
        raise DataError(explain("the file is not a cir_plugins negative bank", got=meta.get("format"),
                                expected=FORMAT))
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise DataError(explain(f"{path}: the bank metadata lacks required keys", got=missing,
                                expected=list(_REQUIRED_META), fix="rebuild the bank")) from None
    if "checksum" in meta:
        if _checksum(tensors["embeddings"], meta) != meta["checksum"]:
            raise DataError(explain(f"{path}: the bank does not match its checksum (edited or corrupt: a changed "
                                    "row, id or metadata entry)", got=meta["checksum"][:16],
                                    fix="rebuild the bank, or copy the file again"))
    else:
        logger.warning("%s was written before banks carried a checksum: its content cannot be verified; "
                       "re-save it (NegativeBank.load(path).save(path))", path)
    try:
        ids = json.loads(meta["ids"])
        rows = json.loads(meta["rows"])
        shape = json.loads(meta["shape"])
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
    embeddings = tensors["embeddings"]
    if list(embeddings.shape) != shape or _dtype_name(embeddings.dtype) != meta.get("dtype"):
        raise DataError(explain("the bank tensor disagrees with its metadata",
                                got=(list(embeddings.shape), str(embeddings.dtype)),
                                expected=(shape, meta.get("dtype")), fix="rebuild the bank"))
    _check_unit_rows(embeddings, str(path), {r: i for i, r in reversed(list(zip(ids, rows)))})
    return embeddings, ids, rows, meta


def read_bank_header(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of the bank file at ``path``, read from its header alone (no rows, no checksum: a
    cheap look before :func:`read_bank_file` loads and verifies it). DataError when it is not a bank."""
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
    """The images' preprocessing a bank records (the image store's ``preprocessing()``: ``kind``, ``size``,
    normalisation), or None for a bank built from a plain mapping or saved before banks recorded it (said
    in a log line). DataError when the entry is not a JSON object."""
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


class _ShardCache:
    """Finished chunks of bank rows on disk, so a killed build resumes.

    Each shard ``rows-<first>-<count>-<key hash>.safetensors`` holds ``rows`` (k,) and ``embeddings``;
    its metadata holds the key (:meth:`key`, everything that changes a row) as JSON, so shards made
    with another key are ignored, the log naming the entries that differ.
    """

    _NAME = re.compile(r"^rows-(\d+)-(\d+)-([0-9a-f]+)\.safetensors$")

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.key_json = json.dumps(key, sort_keys=True)
        self.ids_hash = hashlib.blake2b(self.key_json.encode(), digest_size=8).hexdigest()

    @staticmethod
    def key(representatives: Sequence[str], images: Mapping[str, Tensor], *, fingerprint: str, dtype: torch.dtype,
            similarity: str, device: torch.device) -> dict[str, Any]:
        """Everything that changes a bank row, JSON-ready: the weights' fingerprint, the ids (hashed), the
        dtype, the similarity, the device type, the images' preprocessing and their files' size and mtime."""
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
        return {"fingerprint": fingerprint, "dtype": _dtype_name(dtype), "similarity": similarity,
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
            for row, emb in zip(tensors["rows"].tolist(), tensors["embeddings"]):
                done[int(row)] = emb
        if done:
            logger.info("bank cache %s: %d rows already encoded", self.folder, len(done))
        return done

    def write(self, items: list[tuple[int, Tensor]]) -> None:
        if not items:
            return
        rows = torch.tensor([r for r, _ in items], dtype=torch.long)
        embeddings = torch.stack([e.detach().to("cpu") for _, e in items]).contiguous()
        name = f"rows-{int(rows[0]):09d}-{len(items):06d}-{self.ids_hash}.safetensors"
        atomic_write_bytes(self.folder / name, save({"rows": rows, "embeddings": embeddings},
                                                    metadata={"key": self.key_json}))
