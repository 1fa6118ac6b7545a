"""Training configurations: dataclasses with a comment per field, validated, JSON round-trip.

Optimiser defaults follow the CLIP4Cir fine-tuning code that the method's CLIP4Cir fork keeps:
AdamW, lr 2e-5, betas (0.9, 0.999), eps 1e-7, and no weight_decay argument, i.e. torch's AdamW
default of 0.01 (stated here as the default). The BLIP-based forks use weight_decay 0.05 and
betas (0.9, 0.98): set them for those models. No schedule by default (the release uses
none); ``schedule="cosine"`` uses transformers' ``get_cosine_schedule_with_warmup``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, explain

__all__ = ["TrainConfig", "Stage1Config", "Stage2Config", "AMP_MODES", "SCHEDULES", "TEMPERATURE_PARAMS", "field_docs"]

AMP_MODES = ("auto", "bf16", "fp16", "off")
TEMPERATURE_PARAMS = ("log_tau", "tau")
SCHEDULES = ("constant", "cosine")
# seeds are < 2**32 (numpy's limit; the sampler's per-epoch seed seed * 1_000_003 + epoch then fits int64)
MAX_SEED = 2**32
# AdamW moves each weight by up to ~lr per step: above 1 nothing trains (1e300 overflows to inf at once)
MAX_LR = 1.0
# fields that may differ between a checkpoint and the run that resumes it
RESUMABLE_CHANGES = ("epochs", "show_progress", "checkpoint_every", "output_dir", "shard_bank", "restore_best")


@dataclass
class TrainConfig:
    """Fields shared by both stages (see Stage1Config / Stage2Config for the stage defaults)."""

    # passes over the (sampled) training triplets
    epochs: int = 3
    # triplets per optimiser micro-batch (the global batch under torchrun; each rank takes a slice)
    batch_size: int = 32
    # AdamW learning rate (the release: 2e-5 for CLIP4Cir / TG-CIR); finite, in (0, 1]
    lr: float = 2e-5
    # AdamW decoupled weight decay; 0.01 = torch's default, left in place by the CLIP4Cir / SPN code
    weight_decay: float = 0.01
    # AdamW betas (torch defaults)
    betas: tuple[float, float] = (0.9, 0.999)
    # AdamW epsilon (1e-7 as in the CLIP4Cir / SPN fine-tuning code)
    eps: float = 1e-7
    # softmax temperature tau (logits = similarity / tau); the initial value when learnable
    temperature: float = 0.02
    # learn tau (BLIP4CIR / SPRC style)
    learn_temperature: bool = False
    # what a learned tau is as a parameter: "log_tau" (log tau, kept out of weight decay: a step moves tau by a
    # factor of about exp(lr), so at lr 1e-5 it barely moves) or "tau" (tau itself in the trained weights' AdamW
    # group, with their weight decay, as the BLIP4CIR / SPRC releases: a step moves tau by about lr); both
    # clamped to temperature_range
    temperature_param: str = "log_tau"
    # a learnable tau is clamped to [min, max]
    temperature_range: tuple[float, float] = (1e-3, 1.0)
    # "constant" (no schedule, the release) or "cosine" (linear warmup then cosine decay to 0)
    schedule: str = "constant"
    # optimiser steps of linear warmup (used by "cosine"; with "constant" it is a linear warmup too)
    warmup_steps: int = 0
    # mixed precision: "auto" (bf16 on CUDA when supported, else off), "bf16", "fp16" (GradScaler), "off"
    amp: str = "auto"
    # micro-batches whose gradients are averaged per optimiser step (each loss / grad_accum_steps; an
    # epoch's last, shorter group keeps that divisor)
    grad_accum_steps: int = 1
    # clip the global gradient norm to this value; None = no clipping
    max_grad_norm: float | None = None
    # seed for the sampler, text choice, and torch's RNG (dropout); an int in [0, 2**32)
    seed: int = 0
    # metric (a key of the evaluation's dict) that picks the 'best' epoch; None = the last epoch. The
    # command line builds its validation Evaluator with it; in Python an Evaluator carries its own metric
    # and this field only serves the older evaluate= callable
    select_metric: str | None = "Rmean"
    # "max" (recall-like) or "min" (loss-like), used like select_metric
    select_mode: str = "max"
    # at the end of fit, put the best evaluated epoch's weights back on the model; False = keep the last epoch's
    restore_best: bool = True
    # share of annotated triplets in each epoch when generated ones are mixed in; None = natural mix
    annotated_fraction: float | None = None
    # micro-batches per epoch; None = derived: ceil(number of triplets / batch_size)
    steps_per_epoch: int | None = None
    # also write the 'last' checkpoint every N optimiser steps (mid-epoch); None = only per epoch
    checkpoint_every: int | None = None
    # where checkpoints go ({output_dir}/checkpoints/{last,best}); None = no checkpoints
    output_dir: str | None = None
    # triplets whose target is not in the bank / images: False = DataError naming them, True = drop (logged)
    skip_missing: bool = False
    # tqdm bar with loss and throughput
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.temperature_range = tuple(self.temperature_range)

        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if allow_none and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(explain(f"{type(self).__name__}.{name} must be a positive int"
                                          + (" or None" if allow_none else ""), got=value))

        for name in ("epochs", "batch_size", "grad_accum_steps"):
            positive_int(name)
        for name in ("steps_per_epoch", "checkpoint_every"):
            positive_int(name, allow_none=True)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(explain("warmup_steps must be an int >= 0", got=self.warmup_steps))
        for name in ("lr", "temperature", "eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(explain(f"{name} must be a finite number > 0", got=value))
        if not isinstance(self.weight_decay, (int, float)) or not math.isfinite(self.weight_decay) \
                or self.weight_decay < 0:
            raise ConfigError(explain("weight_decay must be a finite number >= 0", got=self.weight_decay))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(explain("betas must be two numbers in [0, 1)", got=self.betas))
        low, high = (self.temperature_range + (None, None))[:2] if len(self.temperature_range) == 2 else (None, None)
        if low is None or not (0 < low <= high):
            raise ConfigError(explain("temperature_range must be (min, max) with 0 < min <= max",
                                      got=self.temperature_range))
        if self.learn_temperature and not (low <= self.temperature <= high):
            raise ConfigError(explain("the initial temperature lies outside temperature_range",
                                      got=self.temperature, expected=self.temperature_range))
        if self.schedule not in SCHEDULES:
            raise ConfigError(explain("unknown schedule", got=self.schedule, expected=SCHEDULES))
        if self.temperature_param not in TEMPERATURE_PARAMS:
            raise ConfigError(explain("unknown temperature_param", got=self.temperature_param,
                                      expected=TEMPERATURE_PARAMS))
        if self.amp not in AMP_MODES:
            raise ConfigError(explain("unknown amp mode", got=self.amp, expected=AMP_MODES))
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and self.max_grad_norm > 0):
            raise ConfigError(explain("max_grad_norm must be > 0 or None", got=self.max_grad_norm))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < MAX_SEED:
            raise ConfigError(explain(f"{type(self).__name__}.seed must be an int in [0, 2**32)", got=self.seed,
                                      fix="pick a smaller seed (the sampler derives one stream per epoch from it)"))
        if self.lr > MAX_LR:
            raise ConfigError(explain(f"{type(self).__name__}.lr is beyond any AdamW learning rate that trains",
                                      got=self.lr, expected=f"at most {MAX_LR}", fix="e.g. lr=2e-5 (the release)"))
        if not isinstance(self.restore_best, bool):
            raise ConfigError(explain("restore_best must be True or False", got=self.restore_best))
        if self.select_mode not in ("max", "min"):
            raise ConfigError(explain("select_mode must be 'max' or 'min'", got=self.select_mode))
        if self.annotated_fraction is not None and not (0.0 <= self.annotated_fraction <= 1.0):
            raise ConfigError(explain("annotated_fraction must be in [0, 1] or None", got=self.annotated_fraction))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(explain(f"unknown {cls.__name__} fields", got=unknown, expected=sorted(names)))
        return cls(**data)


@dataclass
class Stage2Config(TrainConfig):
    """Stage 2: the query side against the static bank; the target side frozen."""

    # mask each query's reference row (and its duplicates) out of the softmax; False = the release
    mask_reference: bool = True
    # cache encode_reference once per reference id, so a step never runs the vision tower
    cache_reference: bool = True
    # under torchrun: each rank keeps only its N / world bank rows on its device and the loss combines the
    # softmax statistics of all shards (a bank larger than one GPU trains on several); False = a full copy per rank
    shard_bank: bool = True


@dataclass
class Stage1Config(TrainConfig):
    """Stage 1: in-batch negatives; both towers trainable unless the trainer gets ``trainable=``."""

    # in-batch: a batch's targets that are the same image (or duplicates) count once, never as negatives
    mask_duplicates: bool = True
    temperature: float = 0.01


_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^=]+(=.*)?$")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its documentation: the ``#`` comment lines just above the field in the class body
    (the nearest class in the MRO that documents it). The one source of each field's text: the class
    docstrings' Attributes sections and the command line's ``--help`` are built from it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ != __name__:
            continue
        comment: list[str] = []
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source shipped (a frozen or .pyc-only install): names only
            continue
        for line in source.splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                comment.append(stripped.lstrip("#").strip())
                continue
            match = _FIELD_LINE.match(line)
            if match and comment:
                docs[match.group(1)] = " ".join(comment)
            comment = []
    return docs


def _document(cls: type) -> None:
    """Append an ``Attributes:`` section (every field: type, default, documentation) to ``cls.__doc__``,
    so ``help(cls)`` and IDEs show what each field means."""
    docs = field_docs(cls)
    lines = ["", "", "    Attributes:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"        {f.name} ({f.type}, default {default!r}): {docs.get(f.name, 'undocumented')}")
    cls.__doc__ = (cls.__doc__ or cls.__name__).rstrip() + "\n".join(lines) + "\n"


for _cls in (TrainConfig, Stage1Config, Stage2Config):
    _document(_cls)
