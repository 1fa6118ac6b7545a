"""Training configurations: validated dataclasses with a help text per field, JSON round-trip.

Optimiser defaults follow the CLIP4Cir fine-tuning code: AdamW, lr 2e-5, betas (0.9, 0.999), eps 1e-7 and torch's
weight_decay default 0.01; the BLIP-based forks use weight_decay 0.05 and betas (0.9, 0.98). No schedule by
default (as the release); ``schedule="cosine"`` is transformers' ``get_cosine_schedule_with_warmup``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._config import Config, document, field_docs, option
from ..checks import check_positive_int, check_probability
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
class TrainConfig(Config):
    """Fields shared by both stages (see Stage1Config / Stage2Config for the stage defaults)."""

    epochs: int = option(3, "passes over the (sampled) training triplets")
    batch_size: int = option(32, "triplets per micro-batch (the global batch under torchrun; each rank takes a slice)")
    lr: float = option(2e-5, "AdamW learning rate (the release: 2e-5 for CLIP4Cir / TG-CIR); finite, in (0, 1]")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay (torch's default, kept by CLIP4Cir / SPN code)")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas (torch defaults)")
    eps: float = option(1e-7, "AdamW epsilon (1e-7 as in the CLIP4Cir / SPN fine-tuning code)")
    temperature: float = option(0.02, "softmax temperature tau (logits = similarity / tau); initial value if learned")
    learn_temperature: bool = option(False, "learn tau (BLIP4CIR / SPRC style)")
    temperature_param: str = option("log_tau",
        "what a learned tau is as a parameter: \"log_tau\" (log tau, kept out of weight decay: a step moves tau by a "
        "factor of about exp(lr), so at lr 1e-5 it barely moves) or \"tau\" (tau itself in the trained weights' AdamW "
        "group, with their weight decay, as the BLIP4CIR / SPRC releases: a step moves tau by about lr); both clamped "
        "to temperature_range")
    temperature_range: tuple[float, float] = option((1e-3, 1.0), "a learnable tau is clamped to [min, max]")
    schedule: str = option("constant", "\"constant\" (none, the release) or \"cosine\" (warmup, cosine decay to 0)")
    warmup_steps: int = option(0, "optimiser steps of linear warmup (with either schedule)")
    amp: str = option("auto",
        "mixed precision: \"auto\" (bf16 on CUDA when supported, else off), \"bf16\", \"fp16\" (GradScaler), \"off\"")
    grad_accum_steps: int = option(1,
        "micro-batches whose gradients are averaged per optimiser step (each loss / grad_accum_steps; an epoch's last, "
        "shorter group keeps that divisor)")
    max_grad_norm: float | None = option(None, "clip the global gradient norm to this value; None = no clipping")
    seed: int = option(0, "seed for the sampler, text choice, and torch's RNG (dropout); an int in [0, 2**32)")
    restore_best: bool = option(True, "fit ends on the best evaluated epoch's weights; False = on the last epoch's")
    annotated_fraction: float | None = option(None,
        "share of annotated triplets in each epoch when generated ones are mixed in; None = natural mix")
    steps_per_epoch: int | None = option(None, "micro-batches per epoch; None = ceil(number of triplets / batch_size)")
    checkpoint_every: int | None = option(None, "also write 'last' every N optimiser steps; None = per epoch only")
    output_dir: str | None = option(None, "where checkpoints go ({output_dir}/checkpoints/{last,best}); None = none")
    skip_missing: bool = option(False,
        "triplets whose target is not in the bank / images: False = DataError naming them, True = drop (logged)")
    show_progress: bool = option(True, "tqdm bar with loss and throughput")

    def __post_init__(self) -> None:
        self.betas, self.temperature_range = tuple(self.betas), tuple(self.temperature_range)
        for name in ("epochs", "batch_size", "grad_accum_steps", "steps_per_epoch", "checkpoint_every"):
            check_positive_int(f"{type(self).__name__}.{name}", getattr(self, name),
                               allow_none=name in ("steps_per_epoch", "checkpoint_every"))
        check_positive_int("warmup_steps", self.warmup_steps, minimum=0)
        for name in ("lr", "temperature", "eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(explain(f"{name} must be a finite number > 0", got=value))
        if not isinstance(wd := self.weight_decay, (int, float)) or not math.isfinite(wd) or wd < 0:
            raise ConfigError(explain("weight_decay must be a finite number >= 0", got=self.weight_decay))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(explain("betas must be two numbers in [0, 1)", got=self.betas))
        low, high = self.temperature_range if len(self.temperature_range) == 2 else (None, None)
        if low is None or not (0 < low <= high):
            raise ConfigError(explain("temperature_range must be (min, max) with 0 < min <= max",
                                      got=self.temperature_range))
        if self.learn_temperature and not (low <= self.temperature <= high):
            raise ConfigError(explain("the initial temperature lies outside temperature_range",
                                      got=self.temperature, expected=self.temperature_range))
        for name, choices in (("schedule", SCHEDULES), ("temperature_param", TEMPERATURE_PARAMS),
                              ("amp mode", AMP_MODES)):
            if (value := getattr(self, name.split()[0])) not in choices:
                raise ConfigError(explain(f"unknown {name}", got=value, expected=choices))
        if (norm := self.max_grad_norm) is not None and not (isinstance(norm, (int, float)) and norm > 0):
            raise ConfigError(explain("max_grad_norm must be > 0 or None", got=self.max_grad_norm))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < MAX_SEED:
            raise ConfigError(explain(f"{type(self).__name__}.seed must be an int in [0, 2**32)", got=self.seed,
                                      fix="pick a smaller seed (the sampler derives one stream per epoch from it)"))
        if self.lr > MAX_LR:
            raise ConfigError(explain(f"{type(self).__name__}.lr is beyond any AdamW learning rate that trains",
                                      got=self.lr, expected=f"at most {MAX_LR}", fix="e.g. lr=2e-5 (the release)"))
        if not isinstance(self.restore_best, bool):
            raise ConfigError(explain("restore_best must be True or False", got=self.restore_best))
        if self.annotated_fraction is not None:
            check_probability("annotated_fraction", self.annotated_fraction, fix="or None for the natural mix")


@dataclass
class Stage2Config(TrainConfig):
    """Stage 2: the query side against the static bank; the target side frozen."""

    mask_reference: bool = option(True,
        "mask each query's reference row (and its duplicates) out of the softmax; False = the release")
    cache_reference: bool = option(True, "cache encode_reference per reference id: a step never runs the vision tower")
    shard_bank: bool = option(True,
        "under torchrun: each rank keeps only its N / world bank rows on its device and the loss combines the softmax "
        "statistics of all shards (a bank larger than one GPU trains on several); False = a full copy per rank")

@dataclass
class Stage1Config(TrainConfig):
    """Stage 1: in-batch negatives; both towers trainable unless the trainer gets ``trainable=``."""

    mask_duplicates: bool = option(True,
        "in-batch: a batch's targets that are the same image (or duplicates) count once, never as negatives")
    temperature: float = option(0.01, "softmax temperature tau of the in-batch loss; the initial value when learnable")


for _cls in (TrainConfig, Stage1Config, Stage2Config):
    document(_cls)
