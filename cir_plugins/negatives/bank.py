"""The static negative bank of stage 2: every gallery image encoded once by the frozen target side.

A :class:`NegativeBank` holds one L2-normalised row per de-duplicated image (ids that are
duplicates share a row: by default :meth:`NegativeBank.build` finds pixel-identical images itself, so
a copy of a query's target is the target's own row, never a negative), resident on its device in a compact dtype (bf16
on CUDA, float32 on CPU
by default). It remembers a fingerprint of the target-side weights that made it, so a bank built
by another model, or by changed weights, is refused (:class:`~cir_plugins.errors.BankMismatchError`)
instead of silently training against stale negatives.

Shapes: N rows, D embedding dim, T tokens per image for multi-vector banks ("max_token").

File format (``.save`` / ``.load``): one safetensors file, checksummed, every row checked unit length on
load and after a build (:mod:`cir_plugins.negatives.bank_format`).

Building can resume: with ``cache_dir=`` every finished chunk of rows is written atomically as a
shard ``rows-<start>-<count>-<key>.safetensors``; a build that was killed picks the finished shards
up and encodes only the rest. A shard is reused only when everything that changes a row matches
(:meth:`ShardCache.key`): the target-side weights' fingerprint, the representative ids, the bank
dtype, the similarity, the device type (autocast), the images' preprocessing (an ImageStore's
``preprocessing()``: transform, size, normalisation) and each image file's size and modification
time. A plain mapping of tensors has no description: its shards are keyed on its ids only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .. import protocol
from .._atomic import atomic_write_bytes
from .._console import progress_bar
from .._utils import eval_mode, model_device, shard_rows
from ..checks import check_positive_int, dtype_name, require_images
from ..data.dedup import find_duplicates, group_rows
from ..errors import BankMismatchError, ConfigError, DataError, NonFiniteError, ShapeError, explain
from .bank_format import (
    FORMAT,
    VERSION,
    ShardCache,
    bank_preprocessing,
    check_unit_rows,
    checksummed_metadata,
    read_bank_file,
    resolve_bank_dtype,
)
from .distributed import BankShard

__all__ = ["NegativeBank", "exclusion_rows", "probe_split"]

logger = logging.getLogger(__name__)

PROBE_TEXT = "a probe text"


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


def _repeated(ids: Sequence[str]) -> list[str]:
    """The ids met more than once, each listed at its second occurrence, in order (one pass)."""
    seen: set[str] = set()
    dupes = [i for i in ids if i in seen or seen.add(i)]
    return list(dict.fromkeys(dupes))


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


class NegativeBank:
    """Every gallery image, encoded once: ``embeddings`` (N, D) or (N, T, D), one row per group.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`. ``ids`` lists every image id
    the bank covers (duplicates included); ``row_of(id)`` gives its row.

    A bank loaded with ``load(path, shard=(rank, world))`` holds only that rank's rows: ``embeddings`` is the
    slice ``[shard.row_offset, shard.row_offset + n_local)`` and ``shard`` says where it sits; ids and rows stay
    global (``len(bank)`` is the whole bank's N), which is what the sharded loss takes.
    """

    def __init__(self, embeddings: Tensor, ids: Sequence[str], rows: Sequence[int], *,
                 similarity: str, fingerprint: str, preprocessing: Mapping[str, Any] | None = None,
                 shard: BankShard | None = None) -> None:
        """Low-level constructor; prefer :meth:`build` or :meth:`load`.

        Args:
            embeddings: (N, D) or (N, T, D), L2-normalised along the last dim.
            ids: every covered image id, unique.
            rows: the row of each id (same length as ``ids``), each in [0, N); every row used.
            similarity: "dot" for (N, D), "max_token" for (N, T, D).
            fingerprint: protocol.target_fingerprint of the weights that made it.
            preprocessing: what the images were made with (an ImageStore's ``preprocessing()``: transform,
                size, normalisation), saved with the bank so that a command using other preprocessing is
                refused; None when unknown (a plain mapping of tensors, a bank saved before banks recorded it).
            shard: for a slice of a bank, its place (``row_offset``, ``n_total``); None = the whole bank.
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
        dupes = _repeated(ids)
        if dupes:
            raise DataError(explain("bank ids must be unique", got=dupes[:5]))
        n = embeddings.shape[0] if shard is None else shard.n_total
        if shard is not None and not 0 <= shard.row_offset <= shard.row_offset + embeddings.shape[0] <= n:
            raise DataError(explain("the bank slice lies outside the bank", got=(shard.row_offset, embeddings.shape[0]),
                                    expected=f"rows within [0, {n})"))
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
        self.preprocessing = dict(preprocessing) if preprocessing is not None else None
        self.shard = shard

    # ---------------------------------------------------------------------------------------- views
    def __len__(self) -> int:
        """Number of rows N (de-duplicated images) of the whole bank, a slice's too."""
        return int(self.embeddings.shape[0]) if self.shard is None else self.shard.n_total

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

    def to(self, device: Any = None, dtype: Any = None) -> NegativeBank:
        """A bank with the embeddings on ``device`` (and in ``dtype``); self when nothing changes."""
        device = torch.device(device) if device is not None else self.device
        dtype = resolve_bank_dtype(dtype, device) if dtype is not None else self.dtype
        if device == self.device and dtype == self.dtype:
            return self
        moved = self.embeddings.to(device=device, dtype=dtype)
        return NegativeBank(moved, self.ids, [self._row_of[i] for i in self.ids], similarity=self.similarity,
                            fingerprint=self.fingerprint, preprocessing=self.preprocessing, shard=self.shard)

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (all strings), its ``checksum`` included."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "ids": json.dumps(self.ids),
            "rows": json.dumps([self._row_of[i] for i in self.ids]),
            "dtype": dtype_name(self.dtype),
            "similarity": self.similarity,
            "shape": json.dumps(list(self.embeddings.shape)),
            "fingerprint": self.fingerprint,
        }
        if self.preprocessing is not None:
            meta["preprocessing"] = json.dumps(self.preprocessing, sort_keys=True)
        return checksummed_metadata(self.embeddings, meta)

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
              ) -> NegativeBank:
        """Encode every image once with ``model.encode_image`` (no_grad, eval mode).

        Args:
            model: a CIR model (its target side makes the rows).
            image_ids: the ids to cover, unique.
            images: id -> preprocessed image (C, H, W).
            groups: id -> duplicate-group id (from data.dedup, e.g. the augmenter's groups); ids
                of one group share a row, encoded once from the group's first id. Ids absent from
                ``groups`` are their own group.
            dedup: when ``groups`` is None, find the groups here: pixel-identical images
                (:func:`cir_plugins.data.dedup.find_duplicates`: decoded pixels through the
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
        dupes = _repeated(image_ids)
        if dupes:
            raise DataError(explain("image ids repeat", got=dupes[:5],
                                    fix="pass each id once; use groups= for duplicates"))
        check_positive_int("batch_size", batch_size)
        device = torch.device(device) if device is not None else model_device(model)
        dtype = resolve_bank_dtype(dtype, device)
        similarity = protocol.similarity_of(model)
        if groups is None and dedup:
            groups = find_duplicates(image_ids, images, show_progress=show_progress)
        representatives, rows = group_rows(image_ids, groups)  # row r <-> representatives[r]
        require_images(images, representatives)

        if split is None:
            split = probe_split(model, images[representatives[0]].unsqueeze(0).to(device))
        fingerprint = protocol.target_fingerprint(model, split)

        shards = (ShardCache(cache_dir, ShardCache.key(representatives, images, fingerprint=fingerprint,
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
        check_unit_rows(embeddings, f"the bank built from {len(image_ids)} ids"
                         + (f" (shard cache {cache_dir})" if done else ""), representatives)
        describe = getattr(images, "preprocessing", None)
        bank = cls(embeddings, image_ids, rows, similarity=similarity, fingerprint=fingerprint,
                   preprocessing=describe() if callable(describe) else None)
        logger.info("built %r from %d ids (%d re-used from the shard cache)", bank, len(image_ids), len(done))
        return bank

    # ---------------------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (tensor ``embeddings`` + string metadata), atomically."""
        if self.shard is not None:
            raise ConfigError(explain("a slice of a bank cannot be saved as a bank", got=self.shard,
                                      fix="save the whole bank (load it without shard=)"))
        data = save({"embeddings": self.embeddings.detach().to("cpu").contiguous()}, metadata=self.metadata())
        atomic_write_bytes(path, data)
        logger.info("saved %r to %s", self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: Any = "cpu", dtype: Any = None,
             shard: tuple[int, int] | None = None) -> NegativeBank:
        """Read a bank written by :meth:`save` onto ``device`` (in its saved dtype unless ``dtype``).

        ``shard=(rank, world)`` reads only that rank's rows ``shard_rows(N, rank, world)`` (safetensors' slice
        access; only the checksum blocks it touches are verified), so each rank of a torchrun job holds about
        N / world rows in host memory instead of the whole file.
        """
        embeddings, ids, rows, meta = read_bank_file(path, shard=shard)
        place = None
        if shard is not None:
            n_total = json.loads(meta["shape"])[0]
            place = BankShard(shard_rows(n_total, *shard)[0], n_total)
        embeddings = embeddings.to(torch.device(device))
        if dtype is not None:
            embeddings = embeddings.to(resolve_bank_dtype(dtype, embeddings.device))
        return cls(embeddings, ids, rows, similarity=meta["similarity"], fingerprint=meta["fingerprint"],
                   preprocessing=bank_preprocessing(meta, path), shard=place)


def exclusion_rows(bank: NegativeBank, triplets: Sequence[Any]) -> Tensor:
    """(B, 1) int64 rows to mask out of each query's softmax, -1 where nothing is masked.

    The masked row is the reference's row (shared by its duplicates). It is never the target's row:
    when the reference and the target are duplicates of each other the reference row IS the
    positive, so it is left in (and counted as the positive). A reference not in the bank masks
    nothing. Returned on the bank's device. ``bank`` may also be a FAISS index exported from a bank
    (:class:`~cir_plugins.negatives.faiss_index.FaissIndex`, the same id -> row map).
    """
    rows = []
    for triplet in triplets:
        ref_row = bank._row_of.get(triplet.reference, -1)
        target_row = bank._row_of.get(triplet.target, -2) if triplet.target is not None else -2
        rows.append(ref_row if ref_row != target_row else -1)
    return torch.tensor(rows, dtype=torch.long, device=bank.device).reshape(len(rows), 1)  # (B, 1)
