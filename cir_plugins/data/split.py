"""A loaded dataset split: triplets, the gallery, and the images behind both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .triplet import Triplet

__all__ = ["Split"]


@dataclass
class Split:
    """What every loader returns.

    Fields:
        dataset: "cirr", "fashioniq" or "synthetic" (a synthetic world is in the CIRR layout and
            evaluated with the CIRR protocol).
        split: the split's name as on disk ("train", "val", "test1", ...).
        triplets: the queries, in file order (ids only).
        gallery_ids: every candidate image id of the split, in file order, unique.
        images: image id -> preprocessed tensor (an ImageStore, or any Mapping[str, Tensor]).
        category: the FashionIQ category ("dress", "shirt", "toptee"), else None.
        root: the dataset root it was loaded from.
        protocol: the evaluation protocol that applies ("cirr" or "fashioniq").
        info: anything else the loader wants to report (counts, skipped records).
    """

    dataset: str
    split: str
    triplets: Sequence[Triplet]
    gallery_ids: Sequence[str]
    images: Mapping[str, Any]
    category: str | None = None
    root: str | None = None
    protocol: str = "cirr"
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        category = f", category={self.category!r}" if self.category else ""
        return (f"Split(dataset={self.dataset!r}, split={self.split!r}{category}, "
                f"triplets={len(self.triplets)}, gallery={len(self.gallery_ids)})")
