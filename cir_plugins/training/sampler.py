"""The epoch sampler: which triplets, in which order, with which text, for every epoch.

An epoch's plan is a pure function of (seed, epoch), so resuming needs only the epoch and the
number of micro-batches already done: no sampler state beyond two integers.

Mixing annotated and generated triplets (``annotated_fraction=f``): an epoch holds L samples
(L = steps_per_epoch * batch_size, or the number of triplets when steps_per_epoch is None);
round(f * L) of them are annotated and the rest generated. Each kind is drawn as successive
shuffled passes over that kind (so a small annotated set is repeated evenly, and a large
generated set is subsampled without repeats within the epoch), then both are shuffled together.
With ``annotated_fraction=None`` every triplet is one sample (repeated passes if steps_per_epoch
asks for more). Each sample also fixes which of the triplet's texts it uses, drawn uniformly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.triplet import Triplet
from ..errors import ConfigError, explain

__all__ = ["EpochSampler", "Sample"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One training sample: an index into the triplet list and which of its texts to use."""

    index: int
    text_index: int


class EpochSampler:
    """Deterministic per-epoch plans of micro-batches (lists of :class:`Sample`)."""

    def __init__(self, triplets: Sequence[Triplet], batch_size: int, *, seed: int = 0,
                 annotated_fraction: float | None = None, steps_per_epoch: int | None = None) -> None:
        self.triplets = list(triplets)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.annotated_fraction = annotated_fraction
        self.steps_per_epoch = steps_per_epoch
        self.annotated = [i for i, t in enumerate(self.triplets) if t.source == "annotated"]
        self.generated = [i for i, t in enumerate(self.triplets) if t.source != "annotated"]
        if not self.triplets:
            raise ConfigError(explain("no training triplets", got=0, fix="pass at least one triplet"))
        if annotated_fraction is not None:
            if annotated_fraction > 0 and not self.annotated:
                raise ConfigError(explain("annotated_fraction > 0 but there is no annotated triplet",
                                          got=annotated_fraction, fix="set annotated_fraction=None or 0"))
            if annotated_fraction < 1 and not self.generated:
                raise ConfigError(explain("annotated_fraction < 1 but there is no generated triplet",
                                          got=annotated_fraction, fix="set annotated_fraction=None or 1"))

    @property
    def samples_per_epoch(self) -> int:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch * self.batch_size
        return len(self.triplets)

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return -(-len(self.triplets) // self.batch_size)

    def _generator(self, epoch: int) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + epoch)
        return generator

    @staticmethod
    def _draw(pool: list[int], count: int, generator: torch.Generator) -> list[int]:
        """``count`` items from successive shuffled passes over ``pool``."""
        out: list[int] = []
        while len(out) < count:
            order = torch.randperm(len(pool), generator=generator).tolist()
            out.extend(pool[i] for i in order[:count - len(out)])
        return out

    def epoch_plan(self, epoch: int) -> list[list[Sample]]:
        """The micro-batches of ``epoch`` (0-based), each a list of at most batch_size samples."""
        generator = self._generator(epoch)
        total = self.samples_per_epoch
        if self.annotated_fraction is None:
            indices = self._draw(list(range(len(self.triplets))), total, generator)
        else:
            n_annotated = int(round(self.annotated_fraction * total))
            indices = self._draw(self.annotated, n_annotated, generator) if n_annotated else []
            if total - n_annotated:
                indices += self._draw(self.generated, total - n_annotated, generator)
            mix = torch.randperm(len(indices), generator=generator).tolist()
            indices = [indices[i] for i in mix]
        samples = []
        for index in indices:
            n_texts = len(self.triplets[index].texts)
            text_index = int(torch.randint(n_texts, (1,), generator=generator)) if n_texts > 1 else 0
            samples.append(Sample(index, text_index))
        return [samples[i:i + self.batch_size] for i in range(0, len(samples), self.batch_size)]
