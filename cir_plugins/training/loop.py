"""The one training loop both stages share: a step composes ``normalize(compose_query(reference, texts))`` for this
rank's slice of the micro-batch and scores it against the negative source's ``(bank, target_rows, exclude_rows)``:
:class:`BankNegatives` (stage 2) or :class:`~cir_plugins.training.stage1.InBatchNegatives` (stage 1).

Distributed (torchrun, gloo or nccl): each rank's slice loss is scaled by ``n_local * world / B`` and
``DistributedDataParallel`` around :class:`QuerySide` averages the gradients, so a step equals one process's (to
float rounding); a rank with an empty slice runs one stand-in sample at weight 0. Stage 2 shards the bank by
default (``Stage2Config.shard_bank``, :mod:`cir_plugins.negatives.distributed`). Only rank 0 evaluates and writes
checkpoints. The trainer joins the torchrun job itself (:func:`init_distributed`)::

    torchrun --nproc_per_node 2 train_stage2.py      # or: python -m torch.distributed.run ...

    # train_stage2.py
    from cir_plugins.training.loop import init_distributed
    device = init_distributed()                       # optional: the trainer calls it too
    model = make_model().to(device)                   # each rank on its own GPU
    # a path: each rank reads only its rows of the file (NegativeBank.load(path, shard=(rank, world)))
    cp.Stage2Trainer(model, "bank.safetensors", triplets, images, config=cfg).fit()  # rank 0 writes checkpoints
"""

from __future__ import annotations

import abc
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import protocol
from .._console import format_values, progress_bar
from .._utils import eval_mode, model_device, shard_rows
from ..data.triplet import Triplet
from ..embedding import stack_images
from ..errors import ConfigError, DataError, NonFiniteError, ShapeError, explain
from ..negatives.bank import exclusion_rows
from ..negatives.distributed import BankShard
from ..negatives.loss import bank_contrastive_loss
from .checkpoint import TAU_NAME, TEMPERATURE_NAME
from .config import TrainConfig
from .evaluator import Evaluator, as_evaluator
from .resume import Checkpointing
from .sampler import EpochSampler

__all__ = ["Trainer", "BankNegatives", "QuerySide", "init_distributed", "distributed_rank", "non_finite_tensors"]

logger = logging.getLogger(__name__)


def init_distributed() -> torch.device:
    """Join the torchrun job of the environment (``WORLD_SIZE`` > 1 and no group yet: ``init_process_group``, nccl
    on CUDA with the device from ``LOCAL_RANK``, gloo on CPU); returns the device this rank should use
    (``cuda:LOCAL_RANK``, the current CUDA device in one process, or ``cpu``)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    cuda = torch.cuda.is_available()
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
        logger.info("joined torchrun job: rank %d of %d", dist.get_rank(), dist.get_world_size())
    if not cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())


def distributed_rank() -> tuple[int, int]:
    init_distributed()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BankNegatives:
    """Stage 2: every query against the whole static bank (N, D) or (N, T, D), moved to ``device`` when given.

    ``shard=True`` under ``world`` > 1 ranks: this rank keeps only the rows ``shard_rows(N, rank, world)`` and the
    loss is the sharded one (every rank must call it each step).
    """

    def __init__(self, bank: Any, *, mask_reference: bool = True, shard: bool = False,
                 device: torch.device | None = None) -> None:
        self.bank, self.mask_reference, self.similarity = bank, mask_reference, bank.similarity
        rank, world = distributed_rank()
        self.sharded = shard and world > 1
        self.n_total = len(bank)
        row_offset, stop = shard_rows(self.n_total, rank, world) if self.sharded else (0, self.n_total)
        self.shard = BankShard(row_offset, self.n_total) if self.sharded else None
        self.row_offset = row_offset  # the first global row this rank holds
        if bank.shard is not None:  # a bank loaded as this rank's slice: its rows are already the local ones
            if bank.shard != self.shard:
                raise ConfigError(explain("the bank slice is not this rank's share of the bank",
                                          got=bank.shard, expected=self.shard,
                                          fix="load it with NegativeBank.load(path, shard=(rank, world)) on each "
                                              "rank, and keep Stage2Config.shard_bank on"))
            row_offset, stop = 0, bank.embeddings.shape[0]
        rows = bank.embeddings[row_offset:stop]  # (n_local, ...) a view: only this slice is moved
        self.rows = rows.to(device) if device is not None else rows

    def __call__(self, model: Any, triplets: Sequence[Triplet], images: Mapping[str, Tensor],
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        target_rows = self.bank.rows_of([t.target for t in triplets]).to(device, non_blocking=True)  # (b,) global
        exclude = (exclusion_rows(self.bank, triplets).to(device, non_blocking=True)  # (b, 1)
                   if self.mask_reference else None)
        return self.rows, target_rows, exclude

    def loss(self, query: Tensor, bank: Tensor, target_rows: Tensor, exclude: Tensor | None,
             temperature: Tensor) -> Tensor:
        """The static bank never receives a gradient: the exact, chunked (or sharded) bank loss."""
        return bank_contrastive_loss(query, bank, target_rows, temperature, exclude_rows=exclude,
                                     similarity=self.similarity, shard=self.shard)


class QuerySide(nn.Module):
    """The trainable query side as one module for ``DistributedDataParallel``: only the given parameters and the
    learned temperature are registered (the model is not: no buffers to broadcast). ``forward(reference, texts)``
    returns ``(compose_query(reference, texts), tau or None)``, tau = ``exp(temperature)`` when ``as_log``."""

    def __init__(self, model: Any, parameters: Sequence[nn.Parameter], temperature: nn.Parameter | None,
                 as_log: bool = True) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: its frozen parts stay out of DDP
        self.trainable, self.temperature, self.as_log = nn.ParameterList(parameters), temperature, as_log

    def forward(self, reference: Any, texts: list[str]) -> tuple[Tensor, Tensor | None]:
        tau = None if self.temperature is None else self.temperature.exp() if self.as_log else self.temperature
        return protocol.compose(self.model, reference, texts), tau


def non_finite_tensors(named: Sequence[tuple[str, Tensor]]) -> list[str]:
    """Names of the tensors (e.g. gradients) that hold a NaN or an infinity, in the given order.

    One float32 sum per tensor and one host sync: a finite sum proves the tensor finite; only tensors with a
    non-finite sum (which finite values overflowing float32 can also give) are checked element-wise.
    """
    if not named:
        return []
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for _, t in named])  # (P,) float32
    if bool(torch.isfinite(sums).all()):
        return []
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    return [named[k][0] for k in suspects if not bool(torch.isfinite(named[k][1].detach()).all())]


def _new_stats() -> dict[str, float]:
    return {"loss_sum": 0.0, "micro_batches": 0, "steps": 0, "samples": 0, "time": 0.0}


class Trainer(Checkpointing, abc.ABC):
    """The shared loop. Subclasses (Stage1Trainer, Stage2Trainer) choose the trainable parameters,
    the reference source and the negative source in ``_setup``."""

    stage = "train"

    def __init__(self, model: Any, triplets: Sequence[Triplet], images: Mapping[str, Tensor], *,
                 config: TrainConfig, evaluator: Evaluator | None = None,
                 made_with: Mapping[str, Any] | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise ConfigError(explain("config must be a training config dataclass", got=type(config).__name__,
                                      expected="Stage1Config or Stage2Config"))
        protocol.require_protocol(model, type(self).__name__)
        self.evaluator = as_evaluator(evaluator)
        self.model, self.images, self.config = model, images, config
        describe = getattr(images, "preprocessing", None)  # what checkpoints record (TrainedWeights.made_with)
        self.made_with = {**({"preprocessing": describe()} if callable(describe) else {}), **dict(made_with or {})}
        self.rank, self.world = distributed_rank()
        self.triplets = self._check_triplets(list(triplets))
        self.device = model_device(self.model)
        self.history: list[dict[str, Any]] = []
        self.log_tau: nn.Parameter | None = None  # the learned tau as log tau (config.temperature_param "log_tau")
        self.learned_tau: nn.Parameter | None = None  # the learned tau itself (config.temperature_param "tau")
        self._fixed_tau: Tensor | None = None  # a fixed tau on the device, made once (a copy to the GPU syncs)
        self.reference_cache: Any = None  # stage 2: a ReferenceCache, ids -> reference features
        self.negatives: Any = None
        self.trainable: list[tuple[str, nn.Parameter]] = []  # set by _setup
        self._setup()
        self._build_optimizer()
        self.sampler = EpochSampler(self.triplets, config.batch_size, seed=config.seed,
                                    annotated_fraction=config.annotated_fraction,
                                    steps_per_epoch=config.steps_per_epoch)
        self.scheduler, self.amp_dtype = self._build_scheduler(), self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self._epoch = self._micro = self._global_step = 0
        self._epoch_stats = _new_stats()
        self._best: float | None = None
        self.best_epoch: int | None = None  # 1-based epoch of the best evaluation (None: nothing selected)
        self._best_weights: dict[str, Tensor] | None = None  # CPU copy of the best epoch's trainable weights
        self.start_metrics: dict[str, Any] | None = None  # the evaluator's metrics before training (fit)

    def _missing(self, triplet: Triplet) -> str | None:
        """Why this triplet cannot be trained on, or None."""
        if triplet.target is None:
            return "no target"
        return "reference image missing" if triplet.reference not in self.images else None

    def _check_triplets(self, triplets: list[Triplet]) -> list[Triplet]:
        if not triplets:
            raise DataError(explain("no training triplets", got=0, fix="pass the split's triplets"))
        bad = [(t, why) for t in triplets if (why := self._missing(t))]
        if bad:
            named = [f"{t.reference}->{t.target} ({why})" for t, why in bad[:10]]
            if not self.config.skip_missing:
                raise DataError(explain(f"{len(bad)} training triplets cannot be used", got=named,
                                        fix="fix the data, rebuild the bank over these images, or set "
                                            "skip_missing=True"))
            logger.warning("skipping %d triplets that cannot be used, e.g. %s", len(bad), named[:3])
            dropped = {id(t) for t, _ in bad}
            triplets = [t for t in triplets if id(t) not in dropped]
            if not triplets:
                raise DataError(explain("every training triplet was skipped", got=named))
        return triplets

    @abc.abstractmethod
    def _setup(self) -> None:
        """Choose the trainable parameters, the reference source and the negative source."""

    def _build_optimizer(self) -> None:
        config = self.config
        groups = [{"params": [p for _, p in self.trainable], "weight_decay": config.weight_decay}]
        if config.learn_temperature and config.temperature_param == "tau":
            # the releases' nn.Parameter(tau): in the trained weights' group, with their lr and weight decay
            self.learned_tau = nn.Parameter(torch.tensor(float(config.temperature), device=self.device))
            groups[0]["params"].append(self.learned_tau)
        elif config.learn_temperature:
            self.log_tau = nn.Parameter(torch.tensor(math.log(config.temperature), device=self.device))
            groups.append({"params": [self.log_tau], "weight_decay": 0.0})
        if not self.trainable:
            raise ConfigError(explain(f"{self.stage}: no parameter to train", got=0,
                                      fix="check the model's query side or the trainable= override"))
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)

    def _optimizer_steps_per_epoch(self) -> int:
        return -(-len(self.sampler) // self.config.grad_accum_steps)

    def _build_scheduler(self):
        config = self.config
        if config.schedule == "cosine":
            from transformers import get_cosine_schedule_with_warmup
            total = config.epochs * self._optimizer_steps_per_epoch()
            return get_cosine_schedule_with_warmup(self.optimizer, config.warmup_steps, total)
        if config.warmup_steps:
            from transformers import get_constant_schedule_with_warmup
            return get_constant_schedule_with_warmup(self.optimizer, config.warmup_steps)
        return None

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.config.amp
        if amp == "off" or (amp == "auto" and self.device.type != "cuda"):
            return None
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if amp == "fp16" and self.device.type != "cuda":
            raise ConfigError(explain("fp16 autocast needs a CUDA device", got=str(self.device),
                                      fix="use amp='bf16' or 'off' on CPU"))
        return torch.bfloat16 if amp == "bf16" else torch.float16

    def temperature(self) -> Tensor:
        """0-dim float32 tau: learned (the parameter itself, or exp of the log-temperature) or fixed."""
        if self.log_tau is not None:
            return self.log_tau.exp()
        if self.learned_tau is not None:
            return self.learned_tau
        if self._fixed_tau is None:
            self._fixed_tau = torch.tensor(self.config.temperature, dtype=torch.float32, device=self.device)
        return self._fixed_tau

    def _reference(self, ids: Sequence[str], texts: Sequence[str]) -> Any:
        if self.reference_cache is not None:
            return self.reference_cache(ids, texts)
        return protocol.reference_input(self.model, stack_images(self.images, ids, self.device), texts)

    def _loss(self, triplets: Sequence[Triplet], texts: list[str]) -> Tensor:
        query, temperature = self._compose(self._reference([t.reference for t in triplets], texts), texts)
        if not torch.is_tensor(query) or query.dim() != 2 or query.shape[0] != len(triplets):
            raise ShapeError(explain("compose_query must return (B, D)", expected=f"({len(triplets)}, D)",
                                     got=getattr(query, "shape", type(query).__name__)))
        bank, target_rows, exclude = self.negatives(self.model, triplets, self.images, self.device)
        return self.negatives.loss(F.normalize(query, dim=-1), bank, target_rows, exclude, temperature)

    def _compose(self, reference: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(compose_query(reference, texts), temperature); under torchrun through DDP (:class:`QuerySide`)."""
        if self.world == 1:
            return protocol.compose(self.model, reference, texts), self.temperature()
        if getattr(self, "_ddp", None) is None:  # built at the first step, after any resume loaded the weights
            tau = self.log_tau if self.log_tau is not None else self.learned_tau
            self._ddp = nn.parallel.DistributedDataParallel(
                QuerySide(self.model, [p for _, p in self.trainable], tau, as_log=self.log_tau is not None),
                device_ids=[self.device] if self.device.type == "cuda" else None)
        query, temperature = self._ddp(reference, texts)
        return query, (temperature if temperature is not None else self.temperature())

    def _train_mode(self) -> None:
        self.model.train()

    def _named_state(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self._named_parameters()}

    def _named_parameters(self) -> list[tuple[str, Tensor]]:
        """The trainable parameters by name, and the learned temperature when there is one."""
        if self.log_tau is not None:
            return list(self.trainable) + [(TEMPERATURE_NAME, self.log_tau)]
        return list(self.trainable) + ([(TAU_NAME, self.learned_tau)] if self.learned_tau is not None else [])

    def _check_gradients(self) -> None:
        """NonFiniteError naming the parameters with a NaN/inf gradient, before AdamW spreads it (fp16: the scaler)."""
        if bad := non_finite_tensors([(name, p.grad) for name, p in self._named_parameters() if p.grad is not None]):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(explain(f"non-finite gradients in {len(bad)} parameter(s); the step was not applied",
                                         got=bad[:10]))

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        else:
            self._check_gradients()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self._named_parameters()], self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        low, high = self.config.temperature_range
        with torch.no_grad():
            if self.log_tau is not None:
                self.log_tau.clamp_(math.log(low), math.log(high))
            elif self.learned_tau is not None:  # weight decay alone shrinks tau towards 0: keep it in range
                self.learned_tau.clamp_(low, high)
        self._global_step += 1

    def _forward_backward(self, batch: Sequence[Triplet], batch_texts: Sequence[str], accum: int) -> float:
        """Forward + backward of one global micro-batch (gradients / ``accum``); returns its mean loss (all ranks)."""
        total = len(batch)
        start, stop = total * self.rank // self.world, total * (self.rank + 1) // self.world
        triplets, texts = list(batch[start:stop]), list(batch_texts[start:stop])
        weight = len(triplets)  # 0 on a rank whose slice is empty: it still takes part in the step's
        if not triplets and self.world > 1:  # collectives (DDP, sharded bank) with one stand-in sample
            triplets, texts = list(batch[:1]), list(batch_texts[:1])
        loss_sum = 0.0
        if triplets:
            with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
                loss = self._loss(triplets, texts)
            value = float(loss.detach())  # the step's one host sync: the finite check and the reported loss
            loss_sum = value * weight
            # the slice's mean, weighted so that summing over ranks / world gives the global mean
            scaled = loss * (weight * self.world / total) / accum
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            if math.isfinite(value):
                scaled.backward()
        if self.world > 1:
            summed = torch.tensor(loss_sum, dtype=torch.float64, device=self.device)
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            loss_sum = float(summed)
        return loss_sum / total

    def train_step(self, batch: Sequence[Triplet], texts: Sequence[str] | None = None) -> float:
        """One optimiser step on ``batch`` (no accumulation); returns its mean loss. A non-finite loss or gradient
        is a NonFiniteError and nothing is applied.

        Args:
            batch: B triplets (under torchrun the global batch: each rank takes its slice); references (stage 1:
                and targets) in the trainer's images, stage-2 targets in the bank.
            texts: B modification texts, one per triplet; default each triplet's ``texts[0]``.
        """
        batch = list(batch)
        if not batch or not all(isinstance(t, Triplet) for t in batch):
            raise DataError(explain("train_step needs a non-empty list of Triplet",
                                    got=[type(t).__name__ for t in batch[:3]]))
        texts = [t.texts[0] for t in batch] if texts is None else list(texts)
        if len(texts) != len(batch) or not all(isinstance(x, str) for x in texts):
            raise DataError(explain("train_step needs one text string per triplet", got=(len(batch), len(texts))))
        bad = [f"{t.reference}->{t.target} ({why})" for t in batch if (why := self._missing(t))]
        if bad:
            raise DataError(explain(f"{len(bad)} triplets of the batch cannot be trained on", got=bad[:5],
                                    fix="pass triplets whose images (and stage-2 bank rows) the trainer has"))
        self._train_mode()
        loss = self._forward_backward(batch, texts, 1)
        if not math.isfinite(loss):
            raise self._non_finite("loss", "train_step (nothing was applied)", got=loss)
        self._optimizer_step()
        return loss

    def _non_finite(self, what: str, where: str, error: Exception | None = None, got: Any = None) -> NonFiniteError:
        """The error for a non-finite loss or gradient at ``where``; the step's gradients are dropped."""
        self.optimizer.zero_grad(set_to_none=True)
        return NonFiniteError(explain(f"{self.stage}: non-finite {what} at {where}" + (f" ({error})" if error else ""),
                                      got=got, fix="lower the learning rate, check the temperature and data; the "
                                                   "last good checkpoint is kept"))

    def _evaluate_epoch(self, entry: dict[str, Any]) -> bool:
        """Evaluate (rank 0) into ``entry["metrics"]``; whether this epoch is the best so far (on all ranks)."""
        improved = False
        if self.evaluator is not None and self.rank == 0:
            with eval_mode(self.model), torch.no_grad():
                entry["metrics"] = self.evaluator(self.model)
            value = self.evaluator.value(entry["metrics"])
            if value is not None and self.evaluator.better(value, self._best):
                self._best, improved = value, True
        if self.world > 1:
            flag = torch.tensor([int(improved)], device=self.device)
            dist.broadcast(flag, src=0)
            improved = bool(flag.item())
        if improved:
            self.best_epoch = entry["epoch"]
            if self.config.restore_best:
                self._best_weights = {name: p.detach().to("cpu", copy=True) for name, p in self._named_parameters()}
        return improved

    def _warn_if_stalled(self, entry: dict[str, Any]) -> None:
        """Warn, naming the learning rate, when the metric has not moved from ``start_metrics`` (Evaluator.stalled)."""
        start = self.start_metrics
        if start is None or not entry["metrics"] or entry["epoch"] != self.evaluator.stall_epoch(self.config.epochs):
            return
        stalled = self.evaluator.stalled(start, entry["metrics"])
        if stalled:
            logger.warning(
                "%s: after %d of %d epochs the validation metric has not moved from its start (%s; less than %g): "
                "the model is not learning at lr %g. The default learning rate suits large pretrained models; a "
                "small model, or one trained from scratch, usually needs a larger one (e.g. --lr 1e-3) and more "
                "epochs (README, 'Training a small model')", self.stage, entry["epoch"], self.config.epochs, stalled,
                self.evaluator.min_change, self.config.lr)

    def _restore_best(self) -> None:
        """Put the best epoch's weights back (config.restore_best) when the last epoch was not the best."""
        if not self.config.restore_best or self.best_epoch is None or self.best_epoch == len(self.history):
            return
        if self._best_weights is not None:
            with torch.no_grad():
                for name, parameter in self._named_parameters():
                    parameter.copy_(self._best_weights[name])
        else:  # resumed after the best epoch: its weights are the 'best' checkpoint
            self.load_weights("best")
        logger.info("%s: restored the weights of epoch %d (best %s %.4g)", self.stage, self.best_epoch,
                    self.evaluator.metric if self.evaluator else "", self._best)

    def fit(self, resume: bool = False, *, allow_data_change: bool = False) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (continuing the last checkpoint with ``resume=True``).

        Resuming refuses (CheckpointError) a checkpoint trained on other triplets or another bank;
        ``allow_data_change=True`` continues on the new data.

        Returns the history: one dict per epoch with ``epoch``, ``steps`` (optimiser steps), ``micro_batches``,
        ``loss`` (mean), ``time`` (s), ``samples_per_s``, ``temperature``, ``lr`` and ``metrics`` (the evaluator's
        dict, empty without one). With an evaluator metric the best epoch is saved as ``checkpoints/best`` and, with
        ``config.restore_best`` (default), its weights are on the model afterwards (``trainer.best_epoch``).
        """
        config = self.config
        # start_metrics (rank 0) before the seeds are set, so they change nothing training draws
        if not (resume and self._resume(allow_data_change)):
            self.start_metrics = None
            if self.evaluator is not None and self.evaluator.checks_start and self.rank == 0:
                with eval_mode(self.model), torch.no_grad():
                    self.start_metrics = self.evaluator(self.model)
                logger.info("%s before training: %s", self.stage, format_values(self.start_metrics))
            torch.manual_seed(config.seed)
            random.seed(config.seed)
            np.random.seed(config.seed % 2**32)
        while self._epoch < config.epochs:
            epoch, plan = self._epoch, self.sampler.epoch_plan(self._epoch)
            self._train_mode()
            bar = progress_bar(total=len(plan), initial=self._micro, unit="batch",
                               desc=f"{self.stage} epoch {epoch + 1}/{config.epochs}",
                               show_progress=config.show_progress and self.rank == 0)
            started, stats, time_before = time.perf_counter(), self._epoch_stats, self._epoch_stats["time"]
            for micro, samples in enumerate(plan[self._micro:], start=self._micro):
                where = f"epoch {epoch + 1}, micro-batch {micro + 1}, optimiser step {self._global_step + 1}"
                try:
                    loss = self._forward_backward([self.triplets[s.index] for s in samples],
                                                  [self.triplets[s.index].texts[s.text_index] for s in samples],
                                                  config.grad_accum_steps)
                except NonFiniteError as error:
                    raise self._non_finite("loss", where, error) from error
                if not math.isfinite(loss):
                    raise self._non_finite("loss", where, got=loss)
                stats["loss_sum"] += loss
                stats["micro_batches"] += 1
                stats["samples"] += len(samples)
                self._micro = micro + 1
                if self._micro % config.grad_accum_steps == 0 or self._micro == len(plan):
                    try:
                        self._optimizer_step()
                    except NonFiniteError as error:
                        raise self._non_finite("gradients", where, error) from error
                    stats["steps"] += 1
                    stats["time"] = time_before + time.perf_counter() - started
                    if (config.checkpoint_every and self._global_step % config.checkpoint_every == 0
                            and self._micro < len(plan)):
                        self._save("last")
                elapsed = time_before + time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss_sum'] / stats['micro_batches']:.4f}",
                                samples_per_s=f"{stats['samples'] / max(elapsed, 1e-9):.1f}")
            bar.close()
            stats["time"] = time_before + time.perf_counter() - started
            entry = {"epoch": epoch + 1, "steps": stats["steps"], "micro_batches": stats["micro_batches"],
                     "loss": stats["loss_sum"] / max(stats["micro_batches"], 1), "time": stats["time"],
                     "samples_per_s": stats["samples"] / max(stats["time"], 1e-9),
                     "temperature": float(self.temperature().detach()), "lr": self.optimizer.param_groups[0]["lr"],
                     "metrics": {}}
            improved = self._evaluate_epoch(entry)
            self._warn_if_stalled(entry)
            logger.info("%s epoch %d/%d: %s", self.stage, epoch + 1, config.epochs,
                        format_values({k: v for k, v in entry.items() if k not in ("epoch", "metrics")}, digits=4)
                        + (f"; {format_values(entry['metrics'])}" if entry["metrics"] else ""))
            self.history.append(entry)
            self._epoch, self._micro, self._epoch_stats = epoch + 1, 0, _new_stats()
            if improved:  # 'best' first: a run stopped between the saves resumes from a 'last' whose 'best' exists
                self._save("best")
            self._save("last")
            if self.world > 1:
                dist.barrier()
        self._restore_best()
        return self.history
