"""A learned temperature as the release learns it (temperature_param "tau": tau itself in the trained weights'
AdamW group, with their weight decay) or as log tau (the library's default, no weight decay): where each sits in
the optimiser, how far each moves at the same learning rate, and that both save, resume and load."""

from __future__ import annotations

import math

import pytest
from _toy import make_model, make_world

from cir_plugins.errors import CheckpointError, ConfigError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.trained import read_trained
from cir_plugins.training import Stage2Config, Stage2Trainer
from cir_plugins.training.checkpoint import TAU_NAME, TEMPERATURE_NAME


def _trainer(tmp_path=None, **kwargs):
    images, train, _ = make_world()
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    base = dict(epochs=1, batch_size=16, show_progress=False, learn_temperature=True,
                temperature=0.05, output_dir=str(tmp_path) if tmp_path is not None else None)
    return Stage2Trainer(model, bank, train, images, config=Stage2Config(**(base | kwargs)))


def test_tau_sits_in_the_trained_weights_group_with_their_weight_decay():
    trainer = _trainer(temperature_param="tau", weight_decay=0.05)
    assert trainer.log_tau is None and trainer.learned_tau is not None
    group = trainer.optimizer.param_groups[0]
    assert any(p is trainer.learned_tau for p in group["params"]) and group["weight_decay"] == 0.05
    assert len(trainer.optimizer.param_groups) == 1
    assert float(trainer.temperature().detach()) == pytest.approx(0.05)
    # the library's default: log tau in a group of its own, without weight decay
    log = _trainer(weight_decay=0.05)
    assert log.learned_tau is None and log.optimizer.param_groups[1]["params"] == [log.log_tau]
    assert log.optimizer.param_groups[1]["weight_decay"] == 0.0


def test_at_the_same_lr_tau_moves_about_lr_a_step_and_log_tau_about_lr_times_tau():
    """Adam moves a parameter by about lr a step: tau itself by ~lr, tau = exp(log tau) by ~lr * tau."""
    moved = {}
    for param in ("tau", "log_tau"):
        trainer = _trainer(temperature_param=param, lr=1e-3, weight_decay=0.0, epochs=3)
        history = trainer.fit()
        steps = sum(h["steps"] for h in history)
        moved[param] = abs(float(trainer.temperature().detach()) - 0.05) / steps
    assert moved["tau"] > 5e-4  # close to lr (1e-3) per step while the gradient keeps its sign
    assert moved["log_tau"] < 0.1 * moved["tau"]  # about lr * tau = 5e-5 per step


def test_a_tau_run_saves_resumes_and_loads_its_temperature(tmp_path):
    trainer = _trainer(tmp_path, temperature_param="tau", lr=1e-3)
    trainer.fit()
    tau = float(trainer.temperature().detach())
    result = read_trained(tmp_path)
    assert result.temperature == pytest.approx(tau) and TAU_NAME not in result.weights
    assert TEMPERATURE_NAME not in result.weights
    again = _trainer(tmp_path, temperature_param="tau", lr=1e-3, epochs=2)
    again.fit(resume=True)
    assert len(again.history) == 2 and float(again.temperature().detach()) != tau
    # another parametrisation is another configuration: not resumed silently
    with pytest.raises(CheckpointError, match="configuration"):
        _trainer(tmp_path, temperature_param="log_tau", lr=1e-3, epochs=3).fit(resume=True)


def test_tau_is_kept_in_the_temperature_range():
    trainer = _trainer(temperature_param="tau", lr=0.05, temperature_range=(0.04, 0.06), epochs=2)
    taus = [h["temperature"] for h in trainer.fit()]
    assert taus[0] != 0.05 and all(0.04 - 1e-7 <= t <= 0.06 + 1e-7 for t in taus)


def test_an_unknown_parametrisation_is_refused():
    with pytest.raises(ConfigError, match="temperature_param"):
        Stage2Config(temperature_param="exp")
    assert math.isclose(Stage2Config().temperature, 0.02) and Stage2Config().temperature_param == "log_tau"
