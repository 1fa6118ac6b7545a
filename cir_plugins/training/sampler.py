"""The epoch sampler: which triplets, in which order, with which text, for every epoch.

An epoch's plan is a pure function of (seed, epoch): resuming needs only the epoch and the micro-batches done.
An epoch holds L samples (``steps_per_epoch * batch_size``, or the number of triplets). With
``annotated_fraction=f``, round(f * L) are annotated and the rest generated, each kind drawn as successive
shuffled passes over it (a small set repeated evenly, a large one subsampled without repeats), then shuffled
together; with None every triplet is one sample (repeated passes if L asks for more). Each sample's text is
drawn uniformly from its triplet's texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.triplet import Triplet
from ..errors import ConfigError, explain

__all__ = ["EpochSampler", "Sample"]


@dataclass(frozen=True)
class Sample:
    """One training sample: an index into the triplet list and which of its texts to use."""

    index: int
    text_index: int


class EpochSampler:
    """Deterministic per-epoch plans of micro-batches (lists of :class:`Sample`)."""

    def __init__(self, triplets: Sequence[Triplet], batch_size: int, *, seed: int = 0,
                 annotated_fraction: float | None = None, steps_per_epoch: int | None = None) -> None:
        self.triplets, self.batch_size, self.seed = list(triplets), int(batch_size), int(seed)
        self.annotated_fraction, self.steps_per_epoch = annotated_fraction, steps_per_epoch
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
        return len(self.triplets) if self.steps_per_epoch is None else self.steps_per_epoch * self.batch_size

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return -(-len(self.triplets) // self.batch_size) if self.steps_per_epoch is None else self.steps_per_epoch

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
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        total = self.samples_per_epoch
        if self.annotated_fraction is None:
            indices = self._draw(list(range(len(self.triplets))), total, generator)
        else:
            n_annotated = int(round(self.annotated_fraction * total))  # a count of 0 draws nothing from the RNG
            indices = (self._draw(self.annotated, n_annotated, generator)
                       + self._draw(self.generated, total - n_annotated, generator))
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        samples = [Sample(i, int(torch.randint(n, (1,), generator=generator)) if n > 1 else 0)
                   for i in indices for n in [len(self.triplets[i].texts)]]
        return [samples[i:i + self.batch_size] for i in range(0, len(samples), self.batch_size)]
