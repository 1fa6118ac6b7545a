"""What ``fit`` runs after each epoch, and the metric that picks the best epoch: :class:`Evaluator`.

One object carries the evaluation function and its primary metric, so the two cannot drift apart::

    evaluator = cp.Evaluator.on_split(val_split)                 # cp.evaluate(model, val_split), "Rmean", max
    evaluator = cp.Evaluator(lambda m: {"loss": val_loss(m)}, metric="loss", mode="min")
    trainer = cp.Stage2Trainer(model, bank, triplets, images, config=cfg, evaluator=evaluator)
    trainer.fit()          # the best epoch's weights are on the model afterwards (config.restore_best)

``metric=None`` evaluates every epoch but selects nothing (the last epoch is kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, explain

__all__ = ["Evaluator", "as_evaluator", "STALL_SHARE"]

MODES = ("max", "min")
#: the share of the epochs after which a metric still at its start (within ``min_change``) is warned about
STALL_SHARE = 0.5


@dataclass(frozen=True)
class Evaluator:
    """``fn(model) -> {metric name: number}`` run after each epoch (eval mode, no_grad), and the primary metric.

    Attributes:
        fn: the evaluation; its dict is the epoch's history entry's ``metrics``.
        metric: the key that picks the best epoch; None = no selection (keep the last epoch).
        mode: "max" (recall-like) or "min" (loss-like).
        min_change: the smallest change of ``metric`` from before training that counts as learning (e.g. 1.0: one
            point of a recall in percent; the training commands' ``--min-val-change``); ``fit`` then evaluates
            before training too and warns, naming the learning rate, when after :data:`STALL_SHARE` of the epochs
            the metric has moved less. None (default): no check.
    """

    fn: Callable[[Any], Mapping[str, Any]]
    metric: str | None = "Rmean"
    mode: str = "max"
    min_change: float | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(explain("Evaluator.fn must be a callable(model) -> dict", got=type(self.fn).__name__))
        if self.metric is not None and not isinstance(self.metric, str):
            raise ConfigError(explain("Evaluator.metric must be a metric name or None", got=self.metric))
        if self.mode not in MODES:
            raise ConfigError(explain("Evaluator.mode must be 'max' or 'min'", got=self.mode, expected=MODES))
        if self.min_change is not None and (isinstance(self.min_change, bool) or not isinstance(
                self.min_change, (int, float)) or not math.isfinite(self.min_change) or self.min_change < 0):
            raise ConfigError(explain("Evaluator.min_change must be a finite number >= 0 or None",
                                      got=self.min_change, fix="e.g. min_change=1.0 (points of a recall in percent)"))

    @classmethod
    def on_split(cls, split: Any, *, metric: str | None = "Rmean", mode: str = "max", min_change: float | None = None,
                 **evaluate_kwargs: Any) -> Evaluator:
        """Evaluate with :func:`cir_plugins.evaluate` on ``split`` (its keyword arguments pass through),
        selecting on ``metric`` ("Rmean" is the CIRR protocol's; a FashionIQ split reports e.g. "R@10")."""
        from ..evaluation import evaluate  # noqa: PLC0415 (evaluation imports metrics; keep training light)
        protocol = evaluate_kwargs.get("protocol") or getattr(split, "protocol", None)
        if metric == "Rmean" and protocol == "fashioniq" and not isinstance(split, (list, tuple)):
            # fail now, not after the first epoch: one category reports R@10 and R@50 only
            raise ConfigError(explain("one FashionIQ category split has no 'Rmean'",
                                      got=getattr(split, "category", None),
                                      fix="pass metric='R@10' (or 'R@50'), or the three category splits as a list "
                                          "(their 'Rmean' is (Avg R@10 + Avg R@50) / 2)"))
        return cls(lambda model: evaluate(model, split, **evaluate_kwargs), metric=metric, mode=mode,
                   min_change=min_change)

    def __call__(self, model: Any) -> dict[str, Any]:
        metrics = self.fn(model)
        if not isinstance(metrics, Mapping):
            raise ConfigError(explain("the evaluator must return a dict of metrics", got=type(metrics).__name__,
                                      fix="return e.g. {'Rmean': value} (cp.evaluate returns such a dict)"))
        metrics = dict(metrics)
        if self.metric is not None and self.metric not in metrics:
            raise ConfigError(explain("the evaluator's metric is not among the metrics it returned",
                                      got=self.metric, expected=sorted(metrics),
                                      fix="set Evaluator(metric=...) to one of them, or None"))
        return metrics

    def value(self, metrics: Mapping[str, Any]) -> float | None:
        """The primary metric's value in ``metrics`` (None without a metric); a non-finite value is an error."""
        if self.metric is None:
            return None
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            raise ConfigError(explain(f"the evaluator's metric {self.metric!r} is not a finite number", got=value,
                                      fix="check the evaluation (an empty split gives NaN)"))
        return value

    def better(self, value: float, best: float | None) -> bool:
        """True when ``value`` beats ``best`` (ties keep the earlier epoch)."""
        return best is None or (value > best if self.mode == "max" else value < best)

    @property
    def checks_start(self) -> bool:
        """Whether ``fit`` evaluates before training to check that the metric moves (a metric and a min_change)."""
        return self.metric is not None and self.min_change is not None

    @staticmethod
    def stall_epoch(epochs: int) -> int:
        """The 1-based epoch after which :meth:`stalled` is checked: :data:`STALL_SHARE` of ``epochs``, at least 1."""
        return max(1, math.ceil(STALL_SHARE * epochs))

    def stalled(self, start: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
        """``"Rmean 9.90 before training, 10.20 now ..."`` when the metric moved less than ``min_change`` from
        ``start`` to ``now``; None when it moved enough (or nothing is checked)."""
        if not self.checks_start:
            return None
        before, after = self.value(start), self.value(now)
        if abs(after - before) >= self.min_change:
            return None
        return f"{self.metric} {before:.2f} before training, {after:.2f} now (moved {after - before:+.2f})"


def as_evaluator(evaluator: Evaluator | None) -> Evaluator | None:
    """The trainers' ``evaluator=`` argument, checked (None: no evaluation, the last epoch is kept)."""
    if evaluator is not None and not isinstance(evaluator, Evaluator):
        raise ConfigError(explain("evaluator must be a cir_plugins.Evaluator", got=type(evaluator).__name__,
                                  fix="cp.Evaluator(fn, metric='Rmean') or cp.Evaluator.on_split(val_split)"))
    return evaluator
