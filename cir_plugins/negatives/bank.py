"""The static negative bank of stage 2: every gallery image encoded once by the frozen target side.

A :class:`NegativeBank` holds one L2-normalised row per de-duplicated image (duplicate ids share a row, so a copy of
a query's target is the target's own row, never a negative), on its device in a compact dtype. It remembers a
fingerprint of the target-side weights that made it, so a bank of another model or of changed weights is refused
(:class:`~cir_plugins.errors.BankMismatchError`) instead of silently training against stale negatives. Shapes: N
rows, D embedding dim, T tokens per image ("max_token"). File format and shard cache:
:mod:`cir_plugins.negatives.bank_format`.
"""

from __future__ import annotations

import contextlib
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
from . import bank_format as fmt
from .distributed import BankShard

__all__ = ["NegativeBank", "exclusion_rows", "probe_split"]

logger = logging.getLogger(__name__)

PROBE_TEXT = "a probe text"


def probe_split(model: Any, sample: Tensor) -> protocol.ParameterSplit:
    """The model's parameter split, probed with ``sample`` ((n, C, H, W) images) and a fixed text; every parameter
    counts whatever its ``requires_grad`` now (restored after), so a frozen model fingerprints as before freezing."""
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
        self.ids, self.images = list(ids), images

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return index, self.images[self.ids[index]]


def _prefetch_to(batches: Iterable[tuple[Tensor, Tensor]], device: torch.device):
    """(positions, batch) pairs with the batch on ``device``; on CUDA the next batch's copy runs on a side stream."""
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
    if not flags or bool(torch.cat([finite for _, finite in flags]).all()):  # one host sync
        return
    bad = [representatives[todo[p]] for positions, finite in flags
           for p, ok in zip(positions.tolist(), finite.tolist()) if not ok]
    raise NonFiniteError(explain(f"encode_image returned NaN or inf for {len(bad)} images",
                                 got=bad[:10], fix="check these images and the model's weights"))


class NegativeBank:
    """Every gallery image, encoded once: ``embeddings`` (N, D) or (N, T, D), one row per group.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`. ``ids`` lists every covered image id
    (duplicates included); ``row_of(id)`` gives its row. A bank loaded with ``shard=(rank, world)`` holds only that
    rank's rows ``[shard.row_offset, shard.row_offset + n_local)``; ids, rows and ``len(bank)`` stay global.
    """

    def __init__(self, embeddings: Tensor, ids: Sequence[str], rows: Sequence[int], *, similarity: str,
                 fingerprint: str, preprocessing: Mapping[str, Any] | None = None, shard: BankShard | None = None):
        """Low-level constructor; prefer :meth:`build` or :meth:`load`.

        Args:
            embeddings: (N, D) or (N, T, D), L2-normalised along the last dim.
            ids, rows: every covered image id (unique) and its row in [0, N); every row used.
            similarity: "dot" for (N, D), "max_token" for (N, T, D).
            fingerprint: protocol.target_fingerprint of the weights that made it.
            preprocessing: an ImageStore's ``preprocessing()`` (transform, size, normalisation), saved so that a
                command using other preprocessing is refused; None when unknown (a plain mapping of tensors).
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
                                     got=tuple(embeddings.shape), fix="'dot' for (N, D), 'max_token' for (N, T, D)"))
        ids, rows = [str(i) for i in ids], [int(r) for r in rows]
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
        self.embeddings, self.ids, self._row_of, self.similarity = embeddings, ids, dict(zip(ids, rows)), similarity
        self.fingerprint, self.shard = str(fingerprint), shard
        self.preprocessing = dict(preprocessing) if preprocessing is not None else None

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
        dtype = fmt.resolve_bank_dtype(dtype, device) if dtype is not None else self.dtype
        if device == self.device and dtype == self.dtype:
            return self
        moved = self.embeddings.to(device=device, dtype=dtype)
        return NegativeBank(moved, self.ids, [self._row_of[i] for i in self.ids], similarity=self.similarity,
                            fingerprint=self.fingerprint, preprocessing=self.preprocessing, shard=self.shard)

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (all strings), its ``checksum`` included."""
        meta = {"format": fmt.FORMAT, "version": fmt.VERSION, "ids": json.dumps(self.ids),
                "rows": json.dumps([self._row_of[i] for i in self.ids]), "dtype": dtype_name(self.dtype),
                "similarity": self.similarity, "shape": json.dumps(list(self.embeddings.shape)),
                "fingerprint": self.fingerprint}
        if self.preprocessing is not None:
            meta["preprocessing"] = json.dumps(self.preprocessing, sort_keys=True)
        return fmt.checksummed_metadata(self.embeddings, meta)

    def check_compatible(self, model: Any, *, sample: Tensor | None = None,
                         split: protocol.ParameterSplit | None = None) -> None:
        """BankMismatchError naming each difference unless this model's target side made the bank: the similarity,
        the embedding shape (``sample`` images (n, C, H, W), encoded once) and the target-side weights' fingerprint
        (``split`` defaults to :func:`probe_split` on ``sample``, which is then required)."""
        protocol.require_protocol(model, "NegativeBank.check_compatible")
        problems = []
        model_similarity = protocol.similarity_of(model)
        if model_similarity != self.similarity:
            problems.append(f"similarity: bank {self.similarity!r}, model {model_similarity!r}")
        if sample is not None:
            # eval mode: a batch-norm layer in train mode would update its statistics even under no_grad
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

    @classmethod
    def build(cls, model: Any, image_ids: Sequence[str], images: Mapping[str, Tensor], *,
              groups: Mapping[str, str] | None = None, dedup: bool = True, batch_size: int = 64, device: Any = None,
              dtype: Any = None, num_workers: int = 0, show_progress: bool = True,
              cache_dir: str | os.PathLike | None = None, split: protocol.ParameterSplit | None = None) -> NegativeBank:
        """Encode every image once with ``model.encode_image`` (no_grad, eval mode).

        Args:
            model: a CIR model (its target side makes the rows).
            image_ids: the ids to cover, unique.
            images: id -> preprocessed image (C, H, W).
            groups: id -> duplicate-group id (data.dedup, e.g. the augmenter's groups); a group's ids share a row,
                encoded from its first id; ids absent from ``groups`` are their own group.
            dedup: when ``groups`` is None, group pixel-identical images here (data.dedup.find_duplicates);
                default on (the method de-duplicates before stage 2); False = one row per id.
            batch_size, num_workers, show_progress: images per encoder call, DataLoader workers, a tqdm bar.
            device: where the encoder runs and the bank lives (default the model's device).
            dtype: bank dtype (default bf16 on CUDA, float32 elsewhere).
            cache_dir: a folder of finished chunks (:class:`~cir_plugins.negatives.bank_format.ShardCache`), so
                a killed build resumes; None: no cache.
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
        dtype = fmt.resolve_bank_dtype(dtype, device)
        similarity = protocol.similarity_of(model)
        if groups is None and dedup:
            groups = find_duplicates(image_ids, images, show_progress=show_progress)
        representatives, rows = group_rows(image_ids, groups)  # row r <-> representatives[r]
        require_images(images, representatives)
        if split is None:
            split = probe_split(model, images[representatives[0]].unsqueeze(0).to(device))
        fingerprint = protocol.target_fingerprint(model, split)
        shards = None if cache_dir is None else fmt.ShardCache(cache_dir, fmt.ShardCache.key(
            representatives, images, fingerprint=fingerprint, dtype=dtype, similarity=similarity, device=device))
        done = shards.load(device) if shards is not None else {}
        todo = [r for r in range(len(representatives)) if r not in done]
        out: dict[int, Tensor] = dict(done)
        use_cuda, row_dims = device.type == "cuda", "D" if similarity == "dot" else "T, D"
        autocast = use_cuda and dtype in (torch.bfloat16, torch.float16)
        loader = DataLoader(_IdDataset([representatives[r] for r in todo], images), batch_size=batch_size,
                            shuffle=False, num_workers=num_workers, pin_memory=use_cuda)
        # without a shard cache the finite check is one sync at the end: the GPU never waits between batches
        deferred: list[tuple[Tensor, Tensor]] = []
        with eval_mode(model), torch.no_grad():
            batches = progress_bar(loader, desc="build bank", show_progress=show_progress, total=len(loader),
                                   unit="batch")
            for positions, batch in _prefetch_to(batches, device):
                with torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext():
                    emb = model.encode_image(batch)
                if not torch.is_tensor(emb) or emb.dim() != 2 + (similarity != "dot") or emb.shape[0] != batch.shape[0]:
                    raise ShapeError(explain("encode_image returned a tensor of the wrong shape",
                                             got=getattr(emb, "shape", type(emb).__name__),
                                             expected=f"({batch.shape[0]}, {row_dims})",
                                             fix="match the model's similarity attribute to its encode_image output"))
                finite = torch.isfinite(emb.reshape(emb.shape[0], -1)).all(dim=1)  # (b,) per image
                if shards is None:
                    deferred.append((positions, finite))
                else:  # nothing non-finite may reach the cache
                    _raise_non_finite([(positions, finite)], representatives, todo)
                emb = F.normalize(emb.float(), dim=-1).to(dtype)  # (b, D) or (b, T, D), unit rows
                finished = [(todo[p], row_emb) for p, row_emb in zip(positions.tolist(), emb)]
                out.update(finished)
                if shards is not None:
                    shards.write(finished)
        _raise_non_finite(deferred, representatives, todo)
        embeddings = torch.stack([out[r].to(device=device, dtype=dtype) for r in range(len(representatives))])
        fmt.check_unit_rows(embeddings, f"the bank built from {len(image_ids)} ids"
                         + (f" (shard cache {cache_dir})" if done else ""), representatives)
        describe = getattr(images, "preprocessing", None)
        bank = cls(embeddings, image_ids, rows, similarity=similarity, fingerprint=fingerprint,
                   preprocessing=describe() if callable(describe) else None)
        logger.info("built %r from %d ids (%d re-used from the shard cache)", bank, len(image_ids), len(done))
        return bank

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (tensor ``embeddings`` + string metadata), atomically."""
        if self.shard is not None:
            raise ConfigError(explain("a slice of a bank cannot be saved as a bank", got=self.shard,
                                      fix="save the whole bank (load it without shard=)"))
        atomic_write_bytes(path, save({"embeddings": self.embeddings.detach().to("cpu").contiguous()},
                                      metadata=self.metadata()))
        logger.info("saved %r to %s", self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: Any = "cpu", dtype: Any = None,
             shard: tuple[int, int] | None = None) -> NegativeBank:
        """Read a bank written by :meth:`save` onto ``device`` (in its saved dtype unless ``dtype``).

        ``shard=(rank, world)`` reads only that rank's rows ``shard_rows(N, rank, world)`` (verifying the checksum
        blocks it touches), so each rank of a torchrun job holds about N / world rows in host memory."""
        embeddings, ids, rows, meta = fmt.read_bank_file(path, shard=shard)
        n_total = json.loads(meta["shape"])[0] if shard is not None else None
        place = BankShard(shard_rows(n_total, *shard)[0], n_total) if shard is not None else None
        embeddings = embeddings.to(torch.device(device))
        if dtype is not None:
            embeddings = embeddings.to(fmt.resolve_bank_dtype(dtype, embeddings.device))
        return cls(embeddings, ids, rows, similarity=meta["similarity"], fingerprint=meta["fingerprint"],
                   preprocessing=fmt.bank_preprocessing(meta, path), shard=place)


def exclusion_rows(bank: NegativeBank, triplets: Sequence[Any]) -> Tensor:
    """(B, 1) int64 rows to mask out of each query's softmax, -1 where nothing is masked, on the bank's device.

    The masked row is the reference's (shared by its duplicates), never the target's: when reference and target
    are duplicates that row IS the positive and stays in. A reference not in the bank masks nothing. ``bank`` may
    also be a :class:`~cir_plugins.negatives.faiss_index.FaissIndex` (the same id -> row map)."""
    rows = [(bank._row_of.get(t.reference, -1), bank._row_of.get(t.target, -2) if t.target is not None else -2)
            for t in triplets]
    rows = [ref if ref != target else -1 for ref, target in rows]
    return torch.tensor(rows, dtype=torch.long, device=bank.device).reshape(len(rows), 1)  # (B, 1)
