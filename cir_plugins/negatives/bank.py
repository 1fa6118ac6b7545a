"""The static negative bank of stage 2: every gallery image encoded once by the frozen target side.

A :class:`NegativeBank` holds one L2-normalised row per de-duplicated image (ids that are
duplicates share a row: by default :meth:`NegativeBank.build` finds pixel-identical images itself, so
a copy of a query's target is the target's own row, never a negative), resident on its device in a compact dtype (bf16 on CUDA, float32 on CPU
by default). It remembers a fingerprint of the target-side weights that made it, so a bank built
by another model, or by changed weights, is refused (:class:`~cir_plugins.errors.BankMismatchError`)
instead of silently training against stale negatives.

Shapes: N rows, D embedding dim, T tokens per image for multi-vector banks ("max_token").

File format (``.save`` / ``.load``): one safetensors file with a single tensor ``embeddings``
((N, D) or (N, T, D)) and string metadata: ``format`` ("cir_plugins.bank"), ``version``,
``ids`` (JSON list of every covered id), ``rows`` (JSON list, the row of each id, same order),
``dtype``, ``similarity``, ``shape`` (JSON list), ``fingerprint`` and ``checksum`` (SHA-256 over the
tensor's bytes and every other metadata entry). Loading verifies the checksum (a flipped bit or an
edited id is refused), that every metadata key is there, and that every row is unit length
(:data:`UNIT_TOLERANCE`: ``| ||row|| - 1 |`` at most 1e-3 in float32, 1e-2 in bf16 / fp16; a
multi-vector row's tokens are each unit length or all-zero padding, at least one token real).
Building checks the same on the rows it returns (rows taken from the shard cache included).

Building can resume: with ``cache_dir=`` every finished chunk of rows is written atomically as a
shard ``rows-<start>-<count>-<key>.safetensors``; a build that was killed picks the finished shards
up and encodes only the rest. A shard is reused only when everything that changes a row matches
(:meth:`_ShardCache.key`): the target-side weights' fingerprint, the representative ids, the bank
dtype, the similarity, the device type (autocast), the images' preprocessing (an ImageStore's
``preprocessing()``: transform, size, normalisation) and each image file's size and modification
time. A plain mapping of tensors has no description: its shards are keyed on its ids only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from .._console import progress_bar

from .. import protocol
from .._atomic import atomic_write_bytes  # re-exported: the package's one atomic writer
from .._utils import eval_mode, model_device
from ..errors import BankMismatchError, ConfigError, DataError, NonFiniteError, ShapeError, explain

__all__ = ["NegativeBank", "exclusion_rows", "atomic_write_bytes", "probe_split"]

logger = logging.getLogger(__name__)

FORMAT = "cir_plugins.bank"
VERSION = "2"  # 2: metadata holds a checksum (version-1 files load with a warning)
#: largest allowed | ||row|| - 1 | of a bank row, by dtype (rows are normalised in float32, then cast)
UNIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
_REQUIRED_META = ("format", "version", "ids", "rows", "dtype", "similarity", "shape", "fingerprint")
PROBE_TEXT = "a probe text"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def probe_split(model: Any, sample: Tensor) -> protocol.ParameterSplit:
    """The model's parameter split, probed with ``sample`` ((n, C, H, W) images) and a fixed text.

    Every parameter is counted by what it reaches, whatever its ``requires_grad`` flag now (flags are
    restored), so a model frozen for stage 2 fingerprints the same as before freezing.
    """
    params = list(model.named_parameters()) if hasattr(model, "named_parameters") else []
    flags = [p.requires_grad for _, p in params]
    try:
        for _, p in params:
            if p.is_floating_point():
                p.requires_grad_(True)
        return protocol.parameter_split(model, sample, [PROBE_TEXT] * sample.shape[0], sample)
    finally:
        for (_, p), flag in zip(params, flags):
            p.requires_grad_(flag)


class _IdDataset(Dataset):
    """Index -> (index, image tensor (C, H, W)) over a list of ids of an image mapping."""

    def __init__(self, ids: Sequence[str], images: Mapping[str, Tensor]) -> None:
        self.ids = list(ids)
        self.images = images

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return index, self.images[self.ids[index]]


def _prefetch_to(batches: Iterable[tuple[Tensor, Tensor]], device: torch.device):
    """(positions, batch) pairs with the batch on ``device``. On CUDA the next batch's host-to-device copy
    runs on a side stream while the current one is encoded (pinned batches: truly asynchronous)."""
    if device.type != "cuda":
        for positions, batch in batches:
            yield positions, batch.to(device)
        return
    stream = torch.cuda.Stream(device)

    def start(item):
        positions, batch = item
        done = torch.cuda.Event()
        with torch.cuda.stream(stream):
            batch = batch.to(device, non_blocking=True)
            done.record(stream)
        return positions, batch, done

    def ready(started):
        positions, batch, done = started
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)  # this batch's copy only, not the one started after it
        batch.record_stream(compute)  # its memory is not reused before the encoder has read it
        return positions, batch

    ahead = None
    for item in batches:
        current, ahead = ahead, start(item)
        if current is not None:
            yield ready(current)
    if ahead is not None:
        yield ready(ahead)


def _raise_non_finite(flags: list[tuple[Tensor, Tensor]], representatives: Sequence[str], todo: Sequence[int]) -> None:
    """NonFiniteError naming the images whose embedding had a NaN or inf; flags = (positions (b,), finite (b,))."""
    if not flags:
        return
    if bool(torch.cat([finite for _, finite in flags]).all()):  # one host sync
        return
    bad = [representatives[todo[p]] for positions, finite in flags
           for p, ok in zip(positions.tolist(), finite.tolist()) if not ok]
    raise NonFiniteError(explain(f"encode_image returned NaN or inf for {len(bad)} images",
                                 got=bad[:10], fix="check these images and the model's weights"))


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


class NegativeBank:
    """Every gallery image, encoded once: ``embeddings`` (N, D) or (N, T, D), one row per group.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`. ``ids`` lists every image id
    the bank covers (duplicates included); ``row_of(id)`` gives its row.
    """

    def __init__(self, embeddings: Tensor, ids: Sequence[str], rows: Sequence[int], *,
                 similarity: str, fingerprint: str) -> None:
        """Low-level constructor; prefer :meth:`build` or :meth:`load`.

        Args:
            embeddings: (N, D) or (N, T, D), L2-normalised along the last dim.
            ids: every covered image id, unique.
            rows: the row of each id (same length as ``ids``), each in [0, N); every row used.
            similarity: "dot" for (N, D), "max_token" for (N, T, D).
            fingerprint: protocol.target_fingerprint of the weights that made it.
        """
        if not torch.is_tensor(embeddings) or embeddings.dim() not in (2, 3):
            raise ShapeError(explain("bank embeddings must be (N, D) or (N, T, D)",
                                     got=getattr(embeddings, "shape", type(embeddings).__name__)))
        expected_dim = {"dot": 2, "max_token": 3}.get(similarity)
        if expected_dim is None:
            raise ConfigError(explain("unknown bank similarity", got=similarity, expected=protocol.SIMILARITIES))
        if embeddings.dim() != expected_dim:
            raise ShapeError(explain(f"similarity {similarity!r} needs {expected_dim}-d bank embeddings",
                                     got=tuple(embeddings.shape),
                                     fix="use 'dot' for (N, D) and 'max_token' for (N, T, D)"))
        ids = [str(i) for i in ids]
        rows = [int(r) for r in rows]
        if len(ids) != len(rows):
            raise DataError(explain("ids and rows differ in length", got=(len(ids), len(rows))))
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise DataError(explain("bank ids must be unique", got=dupes))
        n = embeddings.shape[0]
        if rows and (min(rows) < 0 or max(rows) >= n):
            raise DataError(explain("bank rows out of range", got=(min(rows), max(rows)), expected=f"[0, {n})"))
        if set(rows) != set(range(n)):
            raise DataError(explain("every bank row must be the row of at least one id",
                                    got=f"{len(set(rows))} rows used", expected=n))
        self.embeddings = embeddings
        self.ids = ids
        self._row_of = dict(zip(ids, rows))
        self.similarity = similarity
        self.fingerprint = str(fingerprint)

    # ---------------------------------------------------------------------------------------- views
    def __len__(self) -> int:
        """Number of rows N (de-duplicated images)."""
        return int(self.embeddings.shape[0])

    def __repr__(self) -> str:
        return (f"NegativeBank(rows={len(self)}, ids={len(self.ids)}, shape={tuple(self.embeddings.shape)}, "
                f"dtype={self.embeddings.dtype}, device={self.embeddings.device}, similarity={self.similarity!r})")

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.dtype

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row_of

    def row_of(self, image_id: str) -> int:
        """The bank row of ``image_id`` (duplicates share one). Unknown id -> DataError naming it."""
        try:
            return self._row_of[image_id]
        except KeyError:
            raise DataError(explain("image id is not in the negative bank", got=image_id,
                                    expected=f"one of the bank's {len(self.ids)} ids",
                                    fix="build the bank over the split that holds this image")) from None

    def rows_of(self, image_ids: Iterable[str]) -> Tensor:
        """(n,) int64 rows of ``image_ids`` on the bank's device. Unknown ids -> DataError naming them."""
        image_ids = list(image_ids)
        missing = [i for i in image_ids if i not in self._row_of]
        if missing:
            raise DataError(explain(f"{len(missing)} image ids are not in the negative bank", got=missing[:10],
                                    fix="build the bank over the split that holds these images"))
        return torch.tensor([self._row_of[i] for i in image_ids], dtype=torch.long, device=self.device)

    def to(self, device: Any = None, dtype: Any = None) -> "NegativeBank":
        """A bank with the embeddings on ``device`` (and in ``dtype``); self when nothing changes."""
        device = torch.device(device) if device is not None else self.device
        dtype = _resolve_dtype(dtype, device) if dtype is not None else self.dtype
        if device == self.device and dtype == self.dtype:
            return self
        moved = self.embeddings.to(device=device, dtype=dtype)
        return NegativeBank(moved, self.ids, [self._row_of[i] for i in self.ids],
                            similarity=self.similarity, fingerprint=self.fingerprint)

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (all strings), its ``checksum`` included."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "ids": json.dumps(self.ids),
            "rows": json.dumps([self._row_of[i] for i in self.ids]),
            "dtype": _dtype_name(self.dtype),
            "similarity": self.similarity,
            "shape": json.dumps(list(self.embeddings.shape)),
            "fingerprint": self.fingerprint,
        }
        meta["checksum"] = _checksum(self.embeddings, meta)
        return meta

    # ---------------------------------------------------------------------------------------- checks
    def check_compatible(self, model: Any, *, sample: Tensor | None = None,
                         split: protocol.ParameterSplit | None = None) -> None:
        """Refuse a model whose target side did not make this bank (BankMismatchError).

        Checks, each named in the error: the similarity kind; the embedding shape (when ``sample``
        images (n, C, H, W) are given, they are encoded once); the fingerprint of the target-side
        weights (``split`` defaults to :func:`probe_split` on ``sample``, which is then required).
        """
        protocol.require_protocol(model, "NegativeBank.check_compatible")
        problems = []
        model_similarity = protocol.similarity_of(model)
        if model_similarity != self.similarity:
            problems.append(f"similarity: bank {self.similarity!r}, model {model_similarity!r}")
        if sample is not None:
            # eval mode for this probe only: a batch-norm layer in train mode would update its
            # statistics (the target side this check fingerprints) even under no_grad
            with eval_mode(model), torch.no_grad():
                out = model.encode_image(sample.to(model_device(model)))
            if tuple(out.shape[1:]) != tuple(self.embeddings.shape[1:]):
                problems.append(f"embedding shape: bank rows {tuple(self.embeddings.shape[1:])}, "
                                f"model encode_image gives {tuple(out.shape[1:])}")
        if split is None:
            if sample is None:
                raise ConfigError(explain("check_compatible needs sample images or a parameter split",
                                          fix="pass sample=(n, C, H, W) images or split=parameter_split(...)"))
            split = probe_split(model, sample)
        fingerprint = protocol.target_fingerprint(model, split)
        if fingerprint != self.fingerprint:
            problems.append(f"fingerprint of the target-side weights: bank {self.fingerprint}, model {fingerprint}")
        if problems:
            raise BankMismatchError(explain(
                "the negative bank was not built by this model's target side: " + "; ".join(problems),
                fix="rebuild the bank with this model (cir-plugins build-bank), or load the matching weights"))

    # ---------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, model: Any, image_ids: Sequence[str], images: Mapping[str, Tensor], *,
              groups: Mapping[str, str] | None = None, dedup: bool = True, batch_size: int = 64,
              device: Any = None,
              dtype: Any = None, num_workers: int = 0, show_progress: bool = True,
              cache_dir: str | os.PathLike | None = None, split: protocol.ParameterSplit | None = None,
              ) -> "NegativeBank":
        """Encode every image once with ``model.encode_image`` (no_grad, eval mode).

        Args:
            model: a CIR model (its target side makes the rows).
            image_ids: the ids to cover, unique.
            images: id -> preprocessed image (C, H, W).
            groups: id -> duplicate-group id (from positives.dedup, e.g. the augmenter's groups); ids
                of one group share a row, encoded once from the group's first id. Ids absent from
                ``groups`` are their own group.
            dedup: when ``groups`` is None, find the groups here: pixel-identical images
                (:func:`cir_plugins.positives.dedup.find_duplicates`: decoded pixels through the
                mapping's ``load_pil`` when it has one, as an ImageStore does, else the image tensors'
                exact values). Default on (the method de-duplicates before stage 2); False = one row
                per id. Ignored when ``groups`` is given.
            batch_size: images per encoder call.
            device: where the encoder runs and the bank lives; default the model's device.
            dtype: bank dtype; default bf16 on CUDA, float32 elsewhere.
            num_workers: DataLoader workers reading images.
            show_progress: a tqdm bar.
            cache_dir: a folder for resumable partial shards (see the module doc); None: no cache.
            split: the model's parameter split (default: probed on the first image).

        Returns: a bank with embeddings (N, D) or (N, T, D), N = number of groups.
        """
        protocol.require_protocol(model, "NegativeBank.build")
        image_ids = list(image_ids)
        if not image_ids:
            raise DataError(explain("no image ids to build a bank from", got=0, fix="pass the gallery's ids"))
        bad = [i for i in image_ids if not isinstance(i, str) or not i]
        if bad:
            raise DataError(explain("image ids must be non-empty strings", got=bad[:5]))
        if len(set(image_ids)) != len(image_ids):
            seen, dupes = set(), []
            for i in image_ids:
                if i in seen:
                    dupes.append(i)
                seen.add(i)
            raise DataError(explain("image ids repeat", got=dupes[:5], fix="pass each id once; use groups= for duplicates"))
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(explain("batch_size must be a positive int", got=batch_size))
        device = torch.device(device) if device is not None else model_device(model)
        dtype = _resolve_dtype(dtype, device)
        similarity = protocol.similarity_of(model)
        if groups is None and dedup:
            from ..positives.dedup import find_duplicates  # noqa: PLC0415 (positives does not import negatives)

            groups = find_duplicates(image_ids, images, show_progress=show_progress)
        groups = dict(groups or {})

        # one representative (the first id met) per group; row r <-> representatives[r]
        row_of_group: dict[str, int] = {}
        representatives: list[str] = []
        rows: list[int] = []
        for image_id in image_ids:
            group = groups.get(image_id, f"\0{image_id}")
            if group not in row_of_group:
                row_of_group[group] = len(representatives)
                representatives.append(image_id)
            rows.append(row_of_group[group])
        missing = [i for i in representatives if i not in images]
        if missing:
            raise DataError(explain(f"{len(missing)} image ids have no image", got=missing[:10],
                                    fix="pass an image mapping that covers every id"))

        if split is None:
            split = probe_split(model, images[representatives[0]].unsqueeze(0).to(device))
        fingerprint = protocol.target_fingerprint(model, split)

        shards = (_ShardCache(cache_dir, _ShardCache.key(representatives, images, fingerprint=fingerprint,
                                                         dtype=dtype, similarity=similarity, device=device))
                  if cache_dir is not None else None)
        done = shards.load(device) if shards is not None else {}

        todo = [r for r in range(len(representatives)) if r not in done]
        out: dict[int, Tensor] = dict(done)
        use_cuda = device.type == "cuda"
        autocast_dtype = dtype if (use_cuda and dtype in (torch.bfloat16, torch.float16)) else None
        loader = DataLoader(_IdDataset([representatives[r] for r in todo], images), batch_size=batch_size,
                            shuffle=False, num_workers=num_workers, pin_memory=use_cuda)
        pending: list[tuple[int, Tensor]] = []
        # without a shard cache nothing needs the rows on the host per batch: the finite check is one sync
        # at the end, so the GPU never waits for the loader between batches
        deferred: list[tuple[Tensor, Tensor]] = []
        with eval_mode(model), torch.no_grad():
            batches = progress_bar(loader, desc="build bank", show_progress=show_progress, total=len(loader),
                                   unit="batch")
            for positions, batch in _prefetch_to(batches, device):
                if autocast_dtype is not None:
                    with torch.autocast(device.type, dtype=autocast_dtype):
                        emb = model.encode_image(batch)
                else:
                    emb = model.encode_image(batch)
                if not torch.is_tensor(emb) or emb.dim() != (2 if similarity == "dot" else 3) \
                        or emb.shape[0] != batch.shape[0]:
                    raise ShapeError(explain(
                        "encode_image returned a tensor of the wrong shape",
                        got=getattr(emb, "shape", type(emb).__name__),
                        expected=f"({batch.shape[0]}, D)" if similarity == "dot" else f"({batch.shape[0]}, T, D)",
                        fix="match the model's similarity attribute to its encode_image output"))
                finite = torch.isfinite(emb.reshape(emb.shape[0], -1)).all(dim=1)  # (b,) per image
                if shards is None:
                    deferred.append((positions, finite))
                else:  # nothing non-finite may reach the cache
                    _raise_non_finite([(positions, finite)], representatives, todo)
                emb = F.normalize(emb.float(), dim=-1).to(dtype)  # (b, D) or (b, T, D), unit rows
                for p, row_emb in zip(positions.tolist(), emb):
                    out[todo[p]] = row_emb
                    pending.append((todo[p], row_emb))
                if shards is not None:
                    shards.write(pending)
                    pending = []
        _raise_non_finite(deferred, representatives, todo)
        embeddings = torch.stack([out[r].to(device=device, dtype=dtype) for r in range(len(representatives))])
        _check_unit_rows(embeddings, f"the bank built from {len(image_ids)} ids"
                         + (f" (shard cache {cache_dir})" if done else ""), representatives)
        bank = cls(embeddings, image_ids, rows, similarity=similarity, fingerprint=fingerprint)
        logger.info("built %r from %d ids (%d re-used from the shard cache)", bank, len(image_ids), len(done))
        return bank

    # ---------------------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (tensor ``embeddings`` + string metadata), atomically."""
        data = save({"embeddings": self.embeddings.detach().to("cpu").contiguous()}, metadata=self.metadata())
        atomic_write_bytes(path, data)
        logger.info("saved %r to %s", self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: Any = "cpu", dtype: Any = None) -> "NegativeBank":
        """Read a bank written by :meth:`save` onto ``device`` (in its saved dtype unless ``dtype``)."""
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
        embeddings = embeddings.to(torch.device(device))
        if dtype is not None:
            embeddings = embeddings.to(_resolve_dtype(dtype, embeddings.device))
        return cls(embeddings, ids, rows, similarity=meta["similarity"], fingerprint=meta["fingerprint"])


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


def exclusion_rows(bank: NegativeBank, triplets: Sequence[Any]) -> Tensor:
    """(B, 1) int64 rows to mask out of each query's softmax, -1 where nothing is masked.

    The masked row is the reference's row (shared by its duplicates). It is never the target's row:
    when the reference and the target are duplicates of each other the reference row IS the
    positive, so it is left in (and counted as the positive). A reference not in the bank masks
    nothing. Returned on the bank's device.
    """
    rows = []
    for triplet in triplets:
        ref_row = bank._row_of.get(triplet.reference, -1)
        target_row = bank._row_of.get(triplet.target, -2) if triplet.target is not None else -2
        rows.append(ref_row if ref_row != target_row else -1)
    return torch.tensor(rows, dtype=torch.long, device=bank.device).reshape(len(rows), 1)  # (B, 1)
