"""load_trained: a run's folder, a checkpoint folder or a weights file onto a fresh model, with clear errors."""

from __future__ import annotations

import pytest
import torch
from _toy import make_model, make_world, recall_at
from safetensors.torch import save_file

import cir_plugins as cp
from cir_plugins.errors import CheckpointError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.protocol import wrap_model
from cir_plugins.training import Stage1Config, Stage1Trainer, Stage2Config, Stage2Trainer
from cir_plugins.training.checkpoint import load_checkpoint


def _trained_stage2(tmp_path, *, evaluate=True):
    images, train, val = make_world()
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    config = Stage2Config(epochs=2, batch_size=16, lr=1e-2, show_progress=False, output_dir=str(tmp_path / "run"))
    evaluator = cp.Evaluator(lambda m: {"R@1": recall_at(m, bank, val, images)}, metric="R@1") if evaluate else None
    trainer = Stage2Trainer(model, bank, train, images, config=config, evaluator=evaluator)
    trainer.fit()
    return model, bank, images, val, tmp_path / "run"


def _query_side(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("text", "fuse"))}


def test_load_trained_puts_the_best_checkpoint_on_a_fresh_model(tmp_path):
    trained, bank, images, val, run = _trained_stage2(tmp_path)
    best = load_checkpoint(run / "checkpoints", "best").weights
    fresh = make_model()
    assert not torch.equal(dict(fresh.named_parameters())["fuse.weight"], best["fuse.weight"])
    assert cp.load_trained(fresh, run) is fresh
    params = dict(fresh.named_parameters())
    for name, value in best.items():
        if name in params:
            assert torch.equal(params[name], value), name
    # the frozen side is untouched and equals the trained model's
    for name in ("image_proj.weight", "ref_proj.weight"):
        assert torch.equal(params[name], dict(trained.named_parameters())[name])


def test_load_trained_without_best_uses_last_and_checkpoint_name_is_honoured(tmp_path):
    trained, _, _, _, run = _trained_stage2(tmp_path, evaluate=False)
    assert not (run / "checkpoints" / "best").exists()
    fresh = cp.load_trained(make_model(), run)
    assert all(torch.equal(a, b) for a, b in zip(_query_side(fresh).values(), _query_side(trained).values()))
    with pytest.raises(CheckpointError, match="'best'"):
        cp.load_trained(make_model(), run, checkpoint="best")
    # a checkpoint folder and its weights file work too
    for path in (run / "checkpoints" / "last", run / "checkpoints" / "last" / "weights.safetensors"):
        again = cp.load_trained(make_model(), path)
        assert torch.equal(again.fuse.weight, trained.fuse.weight)


def test_a_corrupt_best_checkpoint_is_an_error_not_a_silent_last(tmp_path):
    _, _, _, _, run = _trained_stage2(tmp_path)
    weights = run / "checkpoints" / "best" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a value: the size is right, the SHA-256 is not
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="'best' checkpoint .* incomplete or corrupt.*checkpoint='last'"):
        cp.load_trained(make_model(), run)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        cp.load_trained(make_model(), run / "checkpoints" / "best")
    cp.load_trained(make_model(), run, checkpoint="last")  # the other, complete checkpoint still loads


def test_load_trained_across_the_wrapper_prefix(tmp_path):
    # trained wrapped (names "model.fuse...") -> loaded onto the bare model, and the other way round
    images, train, _ = make_world()
    wrapped = wrap_model(make_model(), trainable=["text", "fuse"])
    run = tmp_path / "s1"
    Stage1Trainer(wrapped, train, images, config=Stage1Config(epochs=1, batch_size=16, lr=1e-2, show_progress=False,
                                                              output_dir=str(run)),
                  trainable=["model.text", "model.fuse"]).fit()
    bare = cp.load_trained(make_model(), run)
    assert torch.equal(dict(bare.named_parameters())["fuse.weight"], wrapped.model.fuse.weight)
    file = tmp_path / "bare.safetensors"
    save_file({"fuse.weight": torch.ones(16, 16)}, str(file))
    rewrapped = cp.load_trained(wrap_model(make_model(), trainable=["fuse"]), file)
    assert torch.equal(rewrapped.model.fuse.weight, torch.ones(16, 16))


def test_load_trained_errors_name_the_file_and_parameters(tmp_path):
    file = tmp_path / "w.safetensors"
    save_file({"fuse.weight": torch.ones(16, 16), "nope.weight": torch.ones(2)}, str(file))
    model = make_model()
    before = model.fuse.weight.detach().clone()
    with pytest.raises(CheckpointError, match="nope.weight") as info:
        cp.load_trained(model, file)
    assert "w.safetensors" in str(info.value)
    assert torch.equal(model.fuse.weight, before)  # nothing copied
    save_file({"fuse.weight": torch.ones(8, 16)}, str(file))
    with pytest.raises(CheckpointError, match=r"w.safetensors: 1 saved weights.*"
                                              r"fuse.weight: saved \(8, 16\), model \(16, 16\)"):
        cp.load_trained(model, file)
    file.write_bytes(file.read_bytes()[:40])  # truncated
    with pytest.raises(CheckpointError, match="unreadable"):
        cp.load_trained(model, file)
    with pytest.raises(CheckpointError, match="no trained result"):
        cp.load_trained(model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="output_dir"):
        cp.load_trained(model, tmp_path / "empty")
    with pytest.raises(CheckpointError, match="nn.Module"):
        cp.load_trained(object(), tmp_path / "empty")
