"""The triplet record: ids, never positions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import DataError, explain

__all__ = ["Triplet", "SOURCES"]

SOURCES = ("annotated", "generated")


@dataclass(frozen=True)
class Triplet:
    """One (reference, text, target) training or evaluation query.

    Fields:
        reference: image id of the reference image.
        texts: candidate modification texts. ``texts[0]`` is the canonical text used at evaluation;
            training draws one at random per step (e.g. the template variants of a generated
            triplet, or FashionIQ's two caption orders).
        target: image id of the target, or None where the split has no targets (test splits).
        source: "annotated" (from a human-labelled file) or "generated" (by the augmenter).
        pair_id: the dataset's query id (CIRR ``pairid``), or None.
        members: CIRR ``img_set.members`` (the 6 ids of the query's group, reference included);
            empty where the dataset has no groups.
        meta: anything else the dataset keeps (CIRR ``target_soft``, FashionIQ ``category`` and raw
            ``captions``, the generator's template names); read-only.
    """

    reference: str
    texts: tuple[str, ...]
    target: str | None
    source: str = "annotated"
    pair_id: int | None = None
    members: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", (self.texts,) if isinstance(self.texts, str) else tuple(self.texts))
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        if not isinstance(self.reference, str) or not self.reference:
            raise DataError(explain("Triplet.reference must be a non-empty image id string",
                                    got=self.reference, fix="pass the reference image's id"))
        if self.target is not None and (not isinstance(self.target, str) or not self.target):
            raise DataError(explain("Triplet.target must be a non-empty image id string or None",
                                    got=self.target, fix="pass the target image's id, or None for a test query"))
        if not self.texts:
            raise DataError(explain(f"Triplet({self.reference!r} -> {self.target!r}) has no text",
                                    got=self.texts, fix="give at least one modification text"))
        for text in self.texts:
            if not isinstance(text, str) or not text.strip():
                raise DataError(explain(f"Triplet({self.reference!r} -> {self.target!r}) has an empty or non-string "
                                        "text", got=text, fix="drop the triplet or supply a non-empty text"))
        if self.source not in SOURCES:
            raise DataError(explain("Triplet.source is unknown", got=self.source, expected=SOURCES))

    @property
    def text(self) -> str:
        """The canonical text (``texts[0]``)."""
        return self.texts[0]
