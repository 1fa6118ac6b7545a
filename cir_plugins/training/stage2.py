"""Stage 2: the query side against a static bank of every gallery image; the target side frozen.

Typical use::

    bank = cp.NegativeBank.build(model, split.gallery_ids, split.images, groups=groups)
    trainer = cp.Stage2Trainer(model, bank, split.triplets, split.images,
                               config=cp.Stage2Config(epochs=3, batch_size=256, output_dir="runs/s2"),
                               evaluator=cp.Evaluator.on_split(val_split, metric="Rmean"))
    history = trainer.fit()  # the best epoch's weights are on the model afterwards

At construction the trainer probes the model's parameter split (:func:`cir_plugins.protocol.parameter_split`),
refuses a bank the model did not build (``bank.check_compatible``: similarity, shape, target-side fingerprint),
freezes the target side and caches ``encode_reference`` once per reference id (per (id, text) when the model
declares ``reference_uses_text``), so a step never runs the vision tower. Each step's queries meet every bank row
(the reference row masked; ``mask_reference=False`` keeps it, as the release does); the loop is
:mod:`cir_plugins.training.loop`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import protocol
from .._utils import eval_mode
from ..data.images import preprocessing_differences
from ..data.triplet import Triplet
from ..embedding import embed_images, stack_images
from ..errors import ConfigError, DataError, ShapeError, explain
from ..negatives.bank import NegativeBank, probe_split
from .config import Stage2Config
from .evaluator import Evaluator
from .loop import BankNegatives, Trainer, distributed_rank

__all__ = ["Stage2Trainer", "ReferenceCache"]

logger = logging.getLogger(__name__)


class ReferenceCache:
    """``encode_reference`` computed once per reference id (no_grad, eval mode), kept on the device: ``features``
    (R, ...) one row per id, ``rows`` id -> row. With ``texts`` (one per id, ``reference_uses_text``) one row per
    distinct (id, text) pair, ``rows`` keyed by (id, text), and lookups pass the texts too."""

    def __init__(self, model: Any, ids: Sequence[str], images: Mapping[str, Tensor], device: torch.device,
                 *, texts: Sequence[str] | None = None, batch_size: int = 64, show_progress: bool = True) -> None:
        if texts is not None and len(texts) != len(ids):
            raise ShapeError(explain("ReferenceCache needs one text per reference id", got=(len(ids), len(texts))))
        self.with_text = texts is not None
        keys = list(dict.fromkeys(zip(ids, texts) if self.with_text else ids))  # distinct ids or (id, text) pairs
        with eval_mode(model):
            self.features = embed_images(model.encode_reference, [k[0] for k in keys] if self.with_text else keys,
                                         images, batch_size=batch_size, device=device, desc="cache references",
                                         texts=[k[1] for k in keys] if self.with_text else None,
                                         show_progress=show_progress)  # (R, ...)
        self.rows = {key: row for row, key in enumerate(keys)}

    def __call__(self, ids: Sequence[str], texts: Sequence[str] | None = None) -> Tensor:
        keys = list(zip(ids, texts)) if self.with_text else list(ids)
        rows = [self.rows.get(k) for k in keys]
        if None in rows:
            missing = [k for k, row in zip(keys, rows) if row is None]
            raise DataError(explain("references not in the reference cache", got=missing[:5],
                                    fix="build the cache over every (reference, text) the triplets hold"))
        index = torch.tensor(rows, dtype=torch.long).to(self.features.device, non_blocking=True)  # no blocking copy
        return self.features.index_select(0, index)  # (b, ...)


def _check_bank_preprocessing(bank: NegativeBank, images: Mapping[str, Tensor], allow: bool) -> None:
    """DataError (a warning with ``allow``) when ImageStore ``images`` preprocess otherwise than ``bank`` recorded."""
    describe = getattr(images, "preprocessing", None)
    if bank.preprocessing is None or not callable(describe):
        return
    here = describe()
    if not (differ := preprocessing_differences(here, bank.preprocessing)):
        return
    message = explain("the training images are preprocessed otherwise than the bank's images were",
                      got=f"{ {k: here.get(k) for k in differ} } here, "
                          f"{ {k: bank.preprocessing.get(k) for k in differ} } for the bank",
                      fix="give the trainer images with the bank's preprocessing (e.g. images.with_transform("
                          f"{bank.preprocessing.get('kind')!r}, size={bank.preprocessing.get('size')!r})), build "
                          "the bank from these images, or pass allow_preprocessing_mismatch=True to go on")
    if not allow:
        raise DataError(message)
    logger.warning("%s (going on: allow_preprocessing_mismatch=True)", message)


class Stage2Trainer(Trainer):
    """Fine-tune the query side of ``model`` against ``bank`` on ``triplets``.

    Args:
        model: a CIR model (see :mod:`cir_plugins.protocol`), usually the stage-1 result.
        bank: a :class:`NegativeBank` built by this model's target side (else BankMismatchError), or the path
            of a saved one: under torchrun (``shard_bank``) each rank then reads only its rows of the file.
        triplets: training triplets; every target must be in the bank (else DataError naming them, or dropped
            with ``config.skip_missing``).
        images: id -> (C, H, W) reference images (only references are read, once each when cached).
        config: :class:`Stage2Config`. evaluator, made_with: as for :class:`~cir_plugins.training.Stage1Trainer`
            (the command line's ``base`` is the stage-1 result this run starts from).
        allow_preprocessing_mismatch: go on (with a warning) when ``images`` is an ImageStore preprocessing
            otherwise than the bank recorded (another transform or size). Default: DataError naming both sides.
    """

    stage = "stage2"

    def __init__(self, model: Any, bank: NegativeBank | str | os.PathLike, triplets: Sequence[Triplet],
                 images: Mapping[str, Tensor], *, config: Stage2Config | None = None,
                 evaluator: Evaluator | None = None, made_with: Mapping[str, Any] | None = None,
                 allow_preprocessing_mismatch: bool = False) -> None:
        config = Stage2Config() if config is None else config
        if not isinstance(config, Stage2Config):
            raise ConfigError(explain("Stage2Trainer needs a Stage2Config", got=type(config).__name__))
        if isinstance(bank, (str, os.PathLike)):  # under torchrun each rank reads only its rows of the file
            rank, world = distributed_rank()
            bank = NegativeBank.load(bank, shard=(rank, world) if config.shard_bank and world > 1 else None)
        if not isinstance(bank, NegativeBank):
            raise ConfigError(explain("bank must be a NegativeBank", got=type(bank).__name__,
                                      fix="build one with cir_plugins.NegativeBank.build(...) or .load(path)"))
        self.bank = bank
        _check_bank_preprocessing(bank, images, allow_preprocessing_mismatch)
        super().__init__(model, triplets, images, config=config, evaluator=evaluator, made_with=made_with)

    def _missing(self, triplet: Triplet) -> str | None:
        why = super()._missing(triplet)
        return "target not in the bank" if why is None and triplet.target not in self.bank else why

    def _setup(self) -> None:
        model, config = self.model, self.config
        sharded = config.shard_bank and self.world > 1  # then BankNegatives moves only this rank's rows
        if self.bank.device != self.device and not sharded and self.bank.shard is None:
            logger.info("moving the bank from %s to the model's device %s", self.bank.device, self.device)
            self.bank = self.bank.to(self.device)
        probe = self.triplets[:2]
        reference_images = stack_images(self.images, [t.reference for t in probe], self.device)
        self.bank.check_compatible(model, sample=reference_images, split=probe_split(model, reference_images))
        split = self.split = protocol.parameter_split(model, reference_images, [t.texts[0] for t in probe],
                                                      reference_images)
        if not split.query:
            raise ConfigError(explain("the model has no query-side parameter to train in stage 2",
                                      got=f"{len(split.target)} target-side, {len(split.unused)} unused",
                                      fix="check compose_query, or pass trainable= to wrap_model"))
        query = set(split.query)
        self.trainable = [(name, p) for name, p in model.named_parameters() if name in query]
        split.apply(model)  # requires_grad: True on the query side, False elsewhere
        for name, p in model.named_parameters():
            if name not in query:
                p.grad = None
        target = set(split.target)  # modules whose parameters are all target-side stay in eval mode (no dropout, BN)
        self._frozen_modules = [module for prefix, module in model.named_modules()
                                if (names := [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()])
                                and all(n in target for n in names)]
        if config.cache_reference and callable(getattr(model, "encode_reference", None)):
            with_text = protocol.reference_uses_text(model)  # a frozen fusion of reference and text: a row per pair
            ids = [t.reference for t in self.triplets for _ in (t.texts if with_text else [None])]
            texts = [x for t in self.triplets for x in t.texts] if with_text else None
            self.reference_cache = ReferenceCache(model, ids, self.images, self.device, texts=texts,
                                                  batch_size=max(config.batch_size, 64),
                                                  show_progress=config.show_progress)
        self.negatives = BankNegatives(self.bank, mask_reference=config.mask_reference, shard=sharded,
                                       device=self.device)
        counts = split.counts(model)
        logger.info("stage 2: training %d query-side scalars, %d frozen target-side; bank %r",
                    counts["query"], counts["target"], self.bank)

    def _train_mode(self) -> None:
        self.model.train()
        for module in self._frozen_modules:
            module.eval()
