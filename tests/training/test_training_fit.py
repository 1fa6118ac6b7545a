"""Trainer API: the best epoch's weights restored by fit, the Evaluator, train_step."""

from __future__ import annotations

import pytest
import torch
from _toy import make_model, make_world

import cir_plugins as cp
from cir_plugins.errors import ConfigError, DataError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training import Stage1Config, Stage1Trainer, Stage2Config, Stage2Trainer
from cir_plugins.training.checkpoint import load_checkpoint

QUERY_SIDE = ("text.weight", "fuse.weight", "fuse.bias")


def _setup():
    images, train, _ = make_world()
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    return model, bank, images, train


def _config(**kwargs):
    return Stage2Config(**(dict(epochs=3, batch_size=16, lr=1e-2, show_progress=False) | kwargs))


class ScriptedEvaluator:
    """Reports the given metric values epoch by epoch and keeps a copy of the weights it evaluated, so
    the test knows which epoch's weights are which (the best epoch is not the last)."""

    def __init__(self, values):
        self.values = list(values)
        self.seen = []

    def __call__(self, model):
        self.seen.append({n: p.detach().clone() for n, p in model.named_parameters() if n in QUERY_SIDE})
        return {"score": self.values[len(self.seen) - 1], "other": 0.0}


def _query(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in QUERY_SIDE}


@pytest.mark.parametrize("mode, values, best", [("max", [1.0, 3.0, 2.0], 2), ("min", [5.0, 4.0, 4.5, 6.0], 2),
                                                ("max", [3.0, 1.0, 2.0], 1)])
def test_fit_leaves_the_best_epochs_weights(tmp_path, mode, values, best):
    model, bank, images, train = _setup()
    scripted = ScriptedEvaluator(values)
    trainer = Stage2Trainer(model, bank, train, images, config=_config(epochs=len(values), output_dir=str(tmp_path)),
                            evaluator=cp.Evaluator(scripted, metric="score", mode=mode))
    history = trainer.fit()
    assert trainer.best_epoch == best and [e["metrics"]["score"] for e in history] == values
    now = _query(model)
    for name, value in scripted.seen[best - 1].items():
        assert torch.equal(now[name], value), name  # the best epoch's weights, exactly
        assert not torch.equal(now[name], scripted.seen[-1][name]), name  # not the last epoch's
    saved = load_checkpoint(tmp_path / "checkpoints", "best").weights
    assert all(torch.equal(saved[n], now[n]) for n in QUERY_SIDE)
    last = load_checkpoint(tmp_path / "checkpoints", "last").weights
    assert all(torch.equal(last[n], scripted.seen[-1][n]) for n in QUERY_SIDE)  # 'last' is still the last


def test_restore_best_false_keeps_the_last_epoch():
    model, bank, images, train = _setup()
    scripted = ScriptedEvaluator([1.0, 3.0, 2.0])
    trainer = Stage2Trainer(model, bank, train, images, config=_config(restore_best=False),
                            evaluator=cp.Evaluator(scripted, metric="score"))
    trainer.fit()
    assert trainer.best_epoch == 2
    assert all(torch.equal(_query(model)[n], scripted.seen[-1][n]) for n in QUERY_SIDE)


def test_resumed_fit_restores_a_best_epoch_from_before_the_resume(tmp_path):
    model, bank, images, train = _setup()
    scripted = ScriptedEvaluator([1.0, 3.0, 2.0, 0.5])
    Stage2Trainer(model, bank, train, images, config=_config(epochs=2, output_dir=str(tmp_path)),
                  evaluator=cp.Evaluator(scripted, metric="score")).fit()
    trainer = Stage2Trainer(model, bank, train, images, config=_config(epochs=4, output_dir=str(tmp_path)),
                            evaluator=cp.Evaluator(scripted, metric="score"))
    trainer.fit(resume=True)
    assert trainer.best_epoch == 2 and len(trainer.history) == 4
    assert all(torch.equal(_query(model)[n], scripted.seen[1][n]) for n in QUERY_SIDE)


def test_evaluator_without_metric_selects_nothing_and_keeps_the_last():
    model, bank, images, train = _setup()
    scripted = ScriptedEvaluator([1.0, 3.0])
    trainer = Stage2Trainer(model, bank, train, images, config=_config(epochs=2),
                            evaluator=cp.Evaluator(scripted, metric=None))
    history = trainer.fit()
    assert trainer.best_epoch is None and history[1]["metrics"]["score"] == 3.0
    assert all(torch.equal(_query(model)[n], scripted.seen[-1][n]) for n in QUERY_SIDE)


def test_evaluator_selects_the_best_epoch_by_its_metric():
    model, bank, images, train = _setup()
    scripted = ScriptedEvaluator([1.0, 3.0, 2.0])
    trainer = Stage2Trainer(model, bank, train, images, config=_config(),
                            evaluator=cp.Evaluator(scripted, metric="score"))
    trainer.fit()
    assert trainer.best_epoch == 2
    assert all(torch.equal(_query(model)[n], scripted.seen[1][n]) for n in QUERY_SIDE)


def test_evaluator_errors():
    model, bank, images, train = _setup()
    with pytest.raises(ConfigError, match="cir_plugins.Evaluator"):
        Stage2Trainer(model, bank, train, images, config=_config(), evaluator=lambda m: {})
    with pytest.raises(ConfigError, match="mode"):
        cp.Evaluator(len, mode="best")
    with pytest.raises(ConfigError, match="dict of metrics"):
        cp.Evaluator(lambda m: 0.5)(model)
    trainer = Stage2Trainer(model, bank, train, images, config=_config(epochs=1),
                            evaluator=cp.Evaluator(lambda m: {"R@1": 1.0}, metric="Rmean"))
    with pytest.raises(ConfigError, match="'Rmean'"):
        trainer.fit()


def test_evaluator_on_split_runs_cp_evaluate_and_fit_uses_it():
    from cir_plugins.data.split import Split

    model, bank, images, train = _setup()
    _, _, val = make_world()
    split = Split(dataset="toy", split="val", triplets=val, gallery_ids=list(images), images=images,
                  protocol="fashioniq")
    with pytest.raises(ConfigError, match="no 'Rmean'"):  # refused before any training, not after an epoch
        cp.Evaluator.on_split(split)
    evaluator = cp.Evaluator.on_split(split, metric="R@10", show_progress=False)
    assert evaluator(model) == cp.evaluate(model, split, show_progress=False)
    trainer = Stage2Trainer(model, bank, train, images, config=_config(epochs=2), evaluator=evaluator)
    history = trainer.fit()
    assert all("R@10" in e["metrics"] for e in history) and trainer.best_epoch in (1, 2)


def test_train_step_equals_one_micro_batch_of_fit():
    """train_step on the sampler's first micro-batch gives the same weights as fit's one step on it."""
    torch.manual_seed(0)
    model_a, bank, images, train = _setup()
    model_b = make_model()
    config = _config(epochs=1, batch_size=len(train), steps_per_epoch=1)
    fitted = Stage2Trainer(model_a, bank, train, images, config=config)
    plan = fitted.sampler.epoch_plan(0)[0]
    batch = [fitted.triplets[s.index] for s in plan]
    texts = [t.texts[s.text_index] for t, s in zip(batch, plan)]
    fitted.fit()
    stepped = Stage2Trainer(model_b, bank, train, images, config=config)
    loss = stepped.train_step(batch, texts)
    assert loss == pytest.approx(fitted.history[0]["loss"], rel=1e-6)
    for name in QUERY_SIDE:
        assert torch.allclose(_query(model_a)[name], _query(model_b)[name], atol=1e-7), name
    assert stepped._global_step == 1


def test_train_step_stage1_default_texts_and_errors():
    images, train, _ = make_world(n_train=32)
    model = make_model()
    trainer = Stage1Trainer(model, train, images,
                            config=Stage1Config(epochs=1, batch_size=8, lr=1e-2, show_progress=False))
    before = _query(model)
    loss = trainer.train_step(train[:8])  # texts default to each triplet's texts[0]
    assert loss > 0 and not torch.equal(before["fuse.weight"], _query(model)["fuse.weight"])
    with pytest.raises(DataError, match="non-empty"):
        trainer.train_step([])
    with pytest.raises(DataError, match="one text string per triplet"):
        trainer.train_step(train[:2], ["a"])
    with pytest.raises(DataError, match="missing"):
        trainer.train_step([cp.Triplet("nope", ("red",), train[0].target)])
