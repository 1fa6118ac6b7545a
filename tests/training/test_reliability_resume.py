"""Reliability of checkpoints and resume (issue 18, items 2, 3, 4, 7, 11): leftovers of killed saves with
a repeated process id, the newest complete copy chosen by its recorded step, other data refused, and edited
or mis-shaped checkpoint files refused with CheckpointError naming the file and the entry."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from _toy import make_model, make_world
from safetensors.torch import load_file, save_file
from test_reliability_training import _config
from test_reliability_training import _setup as _training_setup

from cir_plugins._utils import file_sha256
from cir_plugins.errors import CheckpointError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training import Stage2Config, Stage2Trainer
from cir_plugins.training import checkpoint as ckpt


def _setup(n_train=40):
    if n_train == 40:
        return _training_setup()
    images, train, _ = make_world(n_images=23, n_train=n_train, n_val=4)
    model = make_model()
    return model, NegativeBank.build(model, list(images), images, show_progress=False), images, train


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "weights.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _forge(folder, *, weights=None, optimizer=None, state=None) -> None:
    """Edit a checkpoint folder the way a careful forger would: rewrite a file, then update the sizes, hashes
    and checksum in state.json, so only the library's content checks can catch the edit."""
    document = json.loads((folder / "state.json").read_text())
    for file_name, tensors in (("weights.safetensors", weights), ("optimizer.safetensors", optimizer)):
        if tensors is not None:
            save_file(tensors, str(folder / file_name), metadata={"format": ckpt.FORMAT})
            document["files"][file_name] = {"bytes": (folder / file_name).stat().st_size,
                                            "sha256": file_sha256(folder / file_name)}
    if state is not None:
        state(document)
    document["checksum"] = ckpt._document_checksum(document)
    (folder / "state.json").write_text(json.dumps(document))


# -- item 2: a leftover with this process's id does not break saving; leftovers are cleaned up ---------------


def test_a_non_empty_leftover_with_our_own_pid_does_not_break_saving(tmp_path):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    checkpoints = tmp_path / "checkpoints"
    for kind in ("old", "tmp"):  # as a killed earlier run in a container with the same pid leaves them
        leftover = checkpoints / f".{kind}-last-{os.getpid()}"
        shutil.copytree(checkpoints / "last", leftover)
        (leftover / "extra").write_text("x")
    trainer = Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=3))
    history = trainer.fit(resume=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert json.loads((checkpoints / "last" / "state.json").read_text())["epoch"] == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last"]  # every leftover removed after the save


# -- item 3: the newest complete copy by recorded step, never name order, never a silent restart ----------------


def _two_steps(tmp_path):
    """A run with 'last' at epoch 2 (step 10) and a stale copy of epoch 1 (step 5)."""
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(checkpoints / "last", tmp_path / "epoch1")
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)
    return model, bank, images, train, checkpoints


def test_resume_takes_the_newest_complete_leftover_by_step_not_by_name(tmp_path, caplog):
    model, bank, images, train, checkpoints = _two_steps(tmp_path)
    newest = _weights(checkpoints / "last")
    # `last` missing (killed between the renames); name order would pick the stale step-5 copy
    (checkpoints / "last").rename(checkpoints / ".old-last-9999")
    shutil.copytree(tmp_path / "epoch1", checkpoints / ".old-last-0001")
    found = ckpt.load_checkpoint(checkpoints, "last")
    assert found.path.name == ".old-last-9999" and found.state["global_step"] == 10
    _assert_same(found.weights, newest)
    with caplog.at_level(logging.INFO):
        trainer = Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=3))
        trainer.fit(resume=True)
    assert "resumed from" in caplog.text and ".old-last-9999" in caplog.text
    assert [h["epoch"] for h in trainer.history] == [1, 2, 3]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last"]


def test_a_half_deleted_newest_copy_falls_back_to_the_complete_one_not_to_scratch(tmp_path, caplog):
    model, bank, images, train, checkpoints = _two_steps(tmp_path)
    (checkpoints / "last").rename(checkpoints / ".old-last-0001")
    (checkpoints / ".old-last-0001" / "optimizer.safetensors").unlink()  # half deleted
    shutil.copytree(tmp_path / "epoch1", checkpoints / ".old-last-5555")
    with caplog.at_level(logging.INFO):
        trainer = Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2))
        trainer.fit(resume=True)
    assert "starting from scratch" not in caplog.text
    assert ".old-last-5555" in caplog.text and "optimizer.safetensors is missing" in caplog.text
    assert len(trainer.history) == 2  # epoch 1 restored from the complete copy, epoch 2 trained


def test_when_no_copy_is_complete_resume_refuses_instead_of_starting_again(tmp_path):
    model, bank, images, train, checkpoints = _two_steps(tmp_path)
    (checkpoints / "last").rename(checkpoints / ".old-last-7")
    (checkpoints / ".old-last-7" / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no complete copy is left.*weights.safetensors is missing"):
        Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=3)).fit(resume=True)


# -- item 4: other triplets or another bank are refused; an option accepts them; the position is validated --------


@pytest.mark.parametrize("n_train", [24, 80])
def test_resume_on_other_triplets_is_refused_unless_allowed(tmp_path, n_train):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit()
    _, _, other_images, other = _setup(n_train=n_train)
    with pytest.raises(CheckpointError, match=r"trained on other data \(triplets differ\).*allow_data_change"):
        Stage2Trainer(model, bank, other, images, config=_config(tmp_path, epochs=3)).fit(resume=True)
    history = Stage2Trainer(model, bank, other, images, config=_config(tmp_path, epochs=3)).fit(
        resume=True, allow_data_change=True)
    assert len(history) == 3


def test_resume_with_another_bank_is_refused(tmp_path):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    other_ids = list(images)[::-1]  # the same images in another row order
    other_bank = NegativeBank.build(model, other_ids, images, show_progress=False)
    with pytest.raises(CheckpointError, match=r"bank differ"):
        Stage2Trainer(model, other_bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)


def test_an_edited_sampler_position_is_refused(tmp_path):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2, checkpoint_every=2)).fit()
    last = tmp_path / "checkpoints" / "last"
    # edited by hand: the checksum no longer matches, so the copy counts as corrupt
    document = json.loads((last / "state.json").read_text())
    document["micro"] = 4
    (last / "state.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="edited or corrupt"):
        Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=3)).fit(resume=True)
    # forged with a fresh checksum: the position check still refuses it (it would skip micro-batches)
    for micro, step in ((4, 10), (2, 10), (99, 10), (0, 11)):
        _forge(last, state=lambda d, m=micro, s=step: d.update(micro=m, global_step=s))
        with pytest.raises(CheckpointError, match=r"state.json: the saved training position"):
            Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=3)).fit(resume=True)


# -- item 7: weights of a wrong shape are refused with the parameter's name ----------------------------------------


@pytest.mark.parametrize("shape", [(), (1, 16), (3, 5)])
def test_checkpoint_weights_of_a_wrong_shape_are_refused_by_name(tmp_path, shape):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    last = tmp_path / "checkpoints" / "last"
    weights = _weights(last)
    assert weights["fuse.weight"].shape == (16, 16)
    weights["fuse.weight"] = torch.full(shape, 0.5)
    _forge(last, weights=weights)
    before = model.fuse.weight.detach().clone()
    with pytest.raises(CheckpointError, match=rf"fuse\.weight: saved {tuple(shape)!r}".replace("(", r"\(")
                       .replace(")", r"\)")):
        Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)
    assert torch.equal(model.fuse.weight.detach(), before)  # nothing copied
    trainer = Stage2Trainer(model, bank, train, images, config=_config(tmp_path))
    with pytest.raises(CheckpointError, match=r"fuse\.weight"):
        trainer.load_weights("last")


# -- item 11: edited checkpoint JSON and an edited optimizer file -------------------------------------------------


@pytest.mark.parametrize("edit, named", [
    (lambda d: d.pop("epoch"), "'epoch'"),
    (lambda d: d.update(history="lots"), "'history'"),
    (lambda d: d.update(trainable=None), "'trainable'"),
    (lambda d: d.update(epoch_stats={"loss_sum": "x"}), "'epoch_stats'"),
    (lambda d: d.update(optimizer={"param_groups": 3}), "'optimizer'"),
    (lambda d: d.update(global_step=-4), "'global_step'"),
    (lambda d: d.update(rng={"torch": "AAAA", "python": [3], "numpy": []}), "RNG state"),
    (lambda d: d["optimizer"]["param_groups"][0].pop("params"), "optimizer.safetensors"),
])
def test_forged_checkpoint_json_is_refused_naming_the_entry(tmp_path, edit, named):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    last = tmp_path / "checkpoints" / "last"
    _forge(last, state=edit)
    with pytest.raises(CheckpointError) as caught:
        Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)
    assert named in str(caught.value) and str(last) in str(caught.value)


def test_an_edited_optimizer_file_is_refused(tmp_path):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    last = tmp_path / "checkpoints" / "last"
    optimizer = load_file(str(last / "optimizer.safetensors"))
    name = next(k for k in optimizer if k.endswith("exp_avg") and optimizer[k].dim() == 2)
    # a plain edit of the bytes: refused by the recorded hash
    data = bytearray((last / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (last / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors differs from the size or SHA-256"):
        Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)
    # forged with fresh hashes: refused by shape, naming the tensor
    optimizer[name] = optimizer[name][:1]
    _forge(last, optimizer=optimizer)
    with pytest.raises(CheckpointError, match=rf"{name}: saved"):
        Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)
    optimizer["bogus.tensor"] = torch.zeros(2)
    _forge(last, optimizer=optimizer)
    with pytest.raises(CheckpointError, match="the optimiser state is malformed"):
        Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)


@pytest.mark.parametrize("bad, named", [(dict(seed=2**62), "seed"), (dict(seed=-1), "seed"), (dict(seed=True), "seed"),
                                        (dict(lr=1e300), "lr"), (dict(lr=2.0), "lr")])
def test_seed_and_lr_out_of_range_are_refused_at_construction(bad, named):
    from cir_plugins.errors import ConfigError
    from cir_plugins.training import Stage1Config

    for cls in (Stage2Config, Stage1Config):
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{named}"):
            cls(**bad)
    Stage2Config(seed=2**32 - 1, lr=1.0)  # the edges are allowed
