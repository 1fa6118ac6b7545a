"""Checkpoints and resume: an interrupted run (clean stop, mid-epoch stop, SIGKILL) ends equal to an
uninterrupted one on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _toy import make_model, make_world

from cir_plugins.errors import CheckpointError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training import Stage1Config, Stage1Trainer, Stage2Config, Stage2Trainer
from cir_plugins.training.checkpoint import capture_rng, flatten_optimizer_state, restore_rng, unflatten_optimizer_state

HERE = Path(__file__).resolve().parent


def _cfg(out, **kw):
    base = dict(epochs=2, batch_size=16, lr=1e-2, show_progress=False, output_dir=str(out),
                learn_temperature=True, temperature=0.05, schedule="cosine", warmup_steps=2, max_grad_norm=5.0)
    return Stage2Config(**(base | kw))


def _fresh(generated=30):
    images, train, _ = make_world(n_train=60, generated=generated)
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    return model, bank, images, train


def _weights(trainer):
    out = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    out["log_tau"] = trainer.log_tau.detach().clone()
    return out


def test_two_epochs_equal_one_plus_resumed_one(tmp_path):
    model, bank, images, train = _fresh()
    straight = Stage2Trainer(model, bank, train, images, config=_cfg(tmp_path / "a", annotated_fraction=0.5))
    history_straight = straight.fit()
    expected = _weights(straight)

    model, bank, images, train = _fresh()
    first = Stage2Trainer(model, bank, train, images, config=_cfg(tmp_path / "b", annotated_fraction=0.5))
    first.config.epochs = 1  # stop after one epoch (as if killed at the epoch boundary)
    first.fit()
    del first
    model, bank, images, train = _fresh()  # new process state: fresh model and trainer
    torch.manual_seed(1234)  # a different RNG state must not matter: the checkpoint restores it
    second = Stage2Trainer(model, bank, train, images, config=_cfg(tmp_path / "b", annotated_fraction=0.5))
    history = second.fit(resume=True)
    got = _weights(second)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=0), name
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in history_straight], abs=1e-6)
    assert len(history) == 2


def test_mid_epoch_checkpoint_restores_sampler_position(tmp_path):
    model, bank, images, train = _fresh()
    straight = Stage2Trainer(model, bank, train, images, config=_cfg(tmp_path / "a", grad_accum_steps=2))
    straight.fit()
    expected = _weights(straight)

    model, bank, images, train = _fresh()
    calls = {"n": 0}
    original = model.compose_query

    def crash_after_7(reference, texts):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated crash in micro-batch 8")
        return original(reference, texts)

    model.compose_query = crash_after_7
    crashing = Stage2Trainer(model, bank, train, images,
                             config=_cfg(tmp_path / "b", grad_accum_steps=2, checkpoint_every=1))
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    state = json.loads((tmp_path / "b" / "checkpoints" / "last" / "state.json").read_text())
    assert state["micro"] > 0 and state["micro"] % 2 == 0  # a mid-epoch checkpoint at an optimiser step
    model, bank, images, train = _fresh()
    resumed = Stage2Trainer(model, bank, train, images,
                            config=_cfg(tmp_path / "b", grad_accum_steps=2, checkpoint_every=1))
    resumed.fit(resume=True)
    got = _weights(resumed)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=0), name


def test_resume_with_another_config_is_refused(tmp_path):
    model, bank, images, train = _fresh()
    Stage2Trainer(model, bank, train, images, config=_cfg(tmp_path, epochs=1)).fit()
    model, bank, images, train = _fresh()
    with pytest.raises(CheckpointError, match="lr"):
        Stage2Trainer(model, bank, train, images, config=_cfg(tmp_path, lr=0.5)).fit(resume=True)


def test_stage1_resume_equals_straight(tmp_path):
    def run(out, epochs, resume=False):
        images, train, _ = make_world(n_train=40)
        model = make_model()
        cfg = Stage1Config(epochs=epochs, batch_size=8, lr=1e-2, show_progress=False,
                           output_dir=str(out))
        trainer = Stage1Trainer(model, train, images, config=cfg)
        trainer.fit(resume=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    expected = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    got = run(tmp_path / "b", 2, resume=True)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=0), name


def test_optimizer_state_flatten_round_trip():
    p = torch.nn.Parameter(torch.randn(3, 5))
    q = torch.nn.Parameter(torch.randn(7))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=0.1)
    (p.sum() + q.square().sum()).backward()
    opt.step()
    tensors, index = flatten_optimizer_state(opt.state_dict())
    json.dumps(index)  # the index is plain JSON
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(index)))
    opt2 = torch.optim.AdamW([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=0.1)
    opt2.load_state_dict(restored)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert opt2.param_groups[1]["weight_decay"] == 0.0


def test_rng_capture_restore_round_trip():
    import random

    import numpy as np

    state = json.loads(json.dumps(capture_rng()))
    a = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


SCRIPT = r"""
import os, sys, json, signal
import torch
torch.set_num_threads(1)
sys.path.insert(0, {here!r})
from _toy import make_model, make_world
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training import Stage2Config, Stage2Trainer
out, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
images, train, _ = make_world(n_train=60, generated=30)
model = make_model()
bank = NegativeBank.build(model, list(images), images, show_progress=False)
original = model.compose_query
calls = [0]
def compose(reference, texts):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(reference, texts)
model.compose_query = compose
cfg = Stage2Config(epochs=2, batch_size=16, lr=1e-2, show_progress=False, output_dir=out,
                   checkpoint_every=2, annotated_fraction=0.5, learn_temperature=True, temperature=0.05)
Stage2Trainer(model, bank, train, images, config=cfg).fit(resume=resume)
from safetensors.torch import save_file
save_file({{n: p.detach().contiguous() for n, p in model.named_parameters()}}, os.path.join(out, "final.safetensors"))
"""


@pytest.mark.slow  # three fresh Python processes importing torch: about a minute on the shared 2-core box
def test_sigkill_mid_training_then_resume_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(here=str(HERE)))
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(out, kill_at, resume):
        return subprocess.run([sys.executable, str(script), str(out), str(kill_at), "1" if resume else "0"],
                              env=env, capture_output=True, text=True, timeout=300)

    straight = run(tmp_path / "straight", -1, False)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run(tmp_path / "killed", 9, False)  # SIGKILL inside micro-batch 9 of 12 (epoch 2)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    resumed = run(tmp_path / "killed", -1, True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "final.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
