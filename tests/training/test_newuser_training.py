"""Training that does not move the validation metric says so: with Evaluator(min_change=...) (the training
commands: --min-val-change, default 1.0) fit evaluates once before training and, after half the epochs, warns
naming the learning rate when the metric is still at its start."""

from __future__ import annotations

import logging

import pytest
import torch
from _toy import make_model, make_world

import cir_plugins as cp
from cir_plugins.errors import ConfigError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training import Stage2Config, Stage2Trainer


class Scripted:
    """Reports the given metric values call by call (the first call: before training)."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, model):
        self.calls += 1
        return {"Rmean": self.values[self.calls - 1]}


def _fit(values, *, epochs, min_change=1.0, lr=1e-2):
    images, train, _ = make_world()
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    scripted = Scripted(values)
    trainer = Stage2Trainer(model, bank, train, images, config=Stage2Config(epochs=epochs, batch_size=16, lr=lr,
                                                                            show_progress=False),
                            evaluator=cp.Evaluator(scripted, min_change=min_change))
    trainer.fit()
    return trainer, scripted


def _warnings(caplog):
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "has not moved" in r.getMessage()
    ]


def test_a_metric_still_at_its_start_after_half_the_epochs_is_warned_about_naming_the_lr(caplog):
    trainer, scripted = _fit([9.9, 10.0, 10.2, 10.2, 10.3], epochs=4, lr=2e-5)
    assert scripted.calls == 5 and trainer.start_metrics == {"Rmean": 9.9}  # once before, once per epoch
    (message,) = _warnings(caplog)  # checked once, after epoch 2 of 4
    assert "after 2 of 4 epochs" in message and "Rmean 9.90 before training, 10.20 now" in message
    assert "lr 2e-05" in message and "--lr 1e-3" in message and "Training a small model" in message


@pytest.mark.parametrize("values, epochs", [([9.9, 12.0, 20.0, 30.0], 3),   # learning
                                            ([9.9, 11.5, 11.5], 2),         # moved by the check (epoch 1 of 2)
                                            ([40.0, 38.5, 38.0], 2)])       # moved the wrong way: said elsewhere
def test_a_metric_that_moves_gets_no_warning(caplog, values, epochs):
    _fit(values, epochs=epochs)
    assert _warnings(caplog) == []


def test_without_min_change_nothing_is_evaluated_before_training_and_training_is_the_same(caplog):
    checked, _ = _fit([5.0, 5.0, 5.0], epochs=2)
    unchecked, scripted = _fit([5.0, 5.0], epochs=2, min_change=None)
    assert scripted.calls == 2 and unchecked.start_metrics is None and _warnings(caplog)  # only the checked run
    for (name, a), (_, b) in zip(checked.trainable, unchecked.trainable):
        assert torch.equal(a, b), name  # the extra evaluation draws nothing from the training's randomness


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1", True])
def test_min_change_is_validated(bad):
    with pytest.raises(ConfigError, match="min_change"):
        cp.Evaluator(lambda m: {"Rmean": 1.0}, min_change=bad)


def test_the_training_command_warns_by_default(tmp_path, caplog):
    import json
    from pathlib import Path

    from cir_plugins.cli import main

    here = Path(__file__).resolve().parents[1]
    (tmp_path / "tiny.py").write_text(
        f"import sys\nsys.path.insert(0, {str(here)!r})\n"
        "from _toy import make_model\n\ndef build():\n    return make_model()\n"
    )
    world = str(tmp_path / "world")
    config = json.dumps(dict(n_train_triplets=12, n_train_unlabelled=4, n_val_queries=6, n_val_distractors=4,
                             n_test_queries=2, n_test_distractors=2))
    assert main(["world", "--root", world, "--quick", "--config", config, "--no-progress"]) == 0
    assert main(["stage1", "--model", f"{tmp_path / 'tiny.py'}:build", "--dataset", "synthetic", "--root", world,
                 "--image-size", "4", "--val-split", "val", "--lr", "1e-9", "--epochs", "2", "--batch-size", "4",
                 "--out", str(tmp_path / "s1"), "--no-progress"]) == 0
    (message,) = _warnings(caplog)
    assert "after 1 of 2 epochs" in message and "lr 1e-09" in message
