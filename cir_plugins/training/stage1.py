"""Stage 1: contrastive fine-tuning with in-batch negatives (the base models' own recipe), for baselines and the
zero-shot variant (generated triplets only). The loop is :mod:`cir_plugins.training.loop`'s; the negatives are the
batch's targets, encoded with gradient, one row per distinct target (duplicates are never each other's negatives).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import protocol
from ..data.dedup import group_rows
from ..data.triplet import Triplet
from ..embedding import stack_images
from ..errors import ConfigError, explain
from ..similarity import similarity
from .config import Stage1Config
from .evaluator import Evaluator
from .loop import Trainer

__all__ = ["Stage1Trainer", "InBatchNegatives"]

logger = logging.getLogger(__name__)


class InBatchNegatives:
    """Stage 1: the batch's targets, encoded with gradient; one row per distinct target group."""

    def __init__(self, *, groups: Mapping[str, str] | None = None, mask_duplicates: bool = True,
                 similarity: str = "dot") -> None:
        self.groups = dict(groups or {})
        self.mask_duplicates = mask_duplicates
        self.similarity = similarity

    def __call__(self, model: Any, triplets: Sequence[Triplet], images: Mapping[str, Tensor],
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        ids = [t.target for t in triplets]
        # one row per duplicate group: a target's duplicates are its positive, never a negative
        encode_ids, rows = group_rows(ids, self.groups) if self.mask_duplicates else (ids, list(range(len(ids))))
        targets = F.normalize(model.encode_image(stack_images(images, encode_ids, device)), dim=-1)  # (u, D)/(u, T, D)
        return targets, torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True), None

    def loss(self, query: Tensor, targets: Tensor, target_rows: Tensor, exclude: Tensor | None,
             temperature: Tensor) -> Tensor:
        """Cross-entropy over the batch's u <= b distinct targets, differentiable in both towers (no chunking needed):
        query (b, D); targets (u, D) or (u, T, D); target_rows (b,) in [0, u)."""
        logits = similarity(query, targets, self.similarity, bf16=False)  # (b, u) float32, differentiable
        return F.cross_entropy(logits / temperature, target_rows)

class Stage1Trainer(Trainer):
    """In-batch contrastive training of ``model`` on ``triplets``.

    Args:
        model: a CIR model. triplets: training triplets (targets required).
        images: id -> (C, H, W) images of references and targets.
        config: :class:`Stage1Config`.
        evaluator: an :class:`~cir_plugins.training.evaluator.Evaluator` run after each epoch; its metric picks
            the best epoch, whose weights ``fit`` restores (``config.restore_best``).
        groups: id -> duplicate-group id; targets of one group in a batch are one row.
        trainable: names or dotted prefixes, a predicate ``(name, parameter) -> bool`` or the parameters (the rule
            of :func:`cir_plugins.protocol.select_trainable`; e.g. CLIP4Cir's Combiner-only stage
            ``["combiner"]``); None = every parameter that requires grad.
        made_with: JSON-ready provenance recorded in every checkpoint beside the images' preprocessing (the
            command line records ``base``: the results loaded onto the model before training).
    """

    stage = "stage1"

    def __init__(self, model: Any, triplets: Sequence[Triplet], images: Mapping[str, Tensor], *,
                 config: Stage1Config | None = None, evaluator: Evaluator | None = None,
                 groups: Mapping[str, str] | None = None,
                 trainable: Sequence[str] | Callable[[str, nn.Parameter], bool] | None = None,
                 made_with: Mapping[str, Any] | None = None) -> None:
        config = Stage1Config() if config is None else config
        if not isinstance(config, Stage1Config):
            raise ConfigError(explain("Stage1Trainer needs a Stage1Config", got=type(config).__name__))
        self._groups, self._trainable_spec = groups, trainable
        super().__init__(model, triplets, images, config=config, evaluator=evaluator, made_with=made_with)
        if self.world > 1:
            raise ConfigError(explain("Stage1Trainer runs in one process: in-batch negatives across ranks are not "
                                      "gathered", got=f"world size {self.world}",
                                      fix="run stage 1 without torchrun, or use Stage2Trainer under torchrun"))

    def _missing(self, triplet: Triplet) -> str | None:
        why = super()._missing(triplet)
        return "target image missing" if why is None and triplet.target not in self.images else why

    def _setup(self) -> None:
        spec = self._trainable_spec
        named = list(self.model.named_parameters())
        chosen = ({n for n, p in named if p.requires_grad} if spec is None
                  else set(protocol.select_trainable(self.model, spec)))
        for name, p in named:
            p.requires_grad_(name in chosen)
        self.trainable = [(n, p) for n, p in named if n in chosen]
        self.negatives = InBatchNegatives(groups=self._groups, mask_duplicates=self.config.mask_duplicates,
                                          similarity=protocol.similarity_of(self.model))
        logger.info("stage 1: training %d parameter tensors (%d scalars)", len(self.trainable),
                    sum(p.numel() for _, p in self.trainable))
