"""Reliability of training: non-finite loss or gradients stop the run naming the step and keep the
last good checkpoint bit for bit; config values out of range (NaN and infinities included) are refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from _toy import make_model, make_world
from safetensors.torch import load_file

from cir_plugins.errors import ConfigError, NonFiniteError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training import Stage1Config, Stage2Config, Stage2Trainer


def _setup():
    images, train, _ = make_world(n_images=23, n_train=40, n_val=4)
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    return model, bank, images, train


def _config(tmp_path, **kwargs):
    base = dict(epochs=1, batch_size=8, lr=1e-2, show_progress=False, output_dir=str(tmp_path))
    return Stage2Config(**(base | kwargs))


def _last_weights(tmp_path) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / "checkpoints" / "last" / "weights.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_non_finite_loss_keeps_the_last_good_checkpoint_bit_for_bit(tmp_path):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    good = _last_weights(tmp_path)
    original = model.compose_query
    model.compose_query = lambda r, t: original(r, t) * float("inf")
    trainer = Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2, checkpoint_every=1))
    with pytest.raises(NonFiniteError, match=r"epoch 2, micro-batch 1, optimiser step 6"):
        trainer.fit(resume=True)
    _assert_same(_last_weights(tmp_path), good)
    assert all(torch.isfinite(w).all() for w in good.values())


def test_non_finite_gradients_stop_before_the_weights_or_checkpoint_are_touched(tmp_path):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    good = _last_weights(tmp_path)
    # a finite loss whose gradient is not: only an optimiser-step check can catch it
    handle = model.fuse.weight.register_hook(lambda grad: grad * float("nan"))
    trainer = Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2, checkpoint_every=1))
    before = {name: p.detach().clone() for name, p in trainer.trainable}
    try:
        with pytest.raises(NonFiniteError, match=r"epoch 2.*optimiser step 6") as caught:
            trainer.fit(resume=True)
    finally:
        handle.remove()
    assert "fuse.weight" in str(caught.value)  # names the parameter with the bad gradient
    _assert_same(_last_weights(tmp_path), good)  # a NaN step was never checkpointed
    for name, p in trainer.trainable:  # and never applied
        assert torch.equal(p.detach(), before[name]), name


def test_resume_after_a_non_finite_stop_continues_from_the_good_checkpoint(tmp_path):
    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    original = model.compose_query
    model.compose_query = lambda r, t: original(r, t) * float("nan")
    with pytest.raises(NonFiniteError):
        Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)
    model.compose_query = original  # the user fixes the cause (data, lr, ...) and resumes
    history = Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)
    assert [h["epoch"] for h in history] == [1, 2] and all(math.isfinite(h["loss"]) for h in history)


FLOAT_FIELDS = ["lr", "weight_decay", "eps", "temperature", "max_grad_norm"]


@pytest.mark.parametrize("config_class", [Stage1Config, Stage2Config])
@pytest.mark.parametrize("field,value", [(f, v) for f in FLOAT_FIELDS for v in (float("nan"), float("inf"), -1.0)
                                         # max_grad_norm=inf is a valid "never clip" for torch: not refused
                                         if not (f == "max_grad_norm" and v == float("inf"))])
def test_non_finite_or_negative_config_values_are_refused(config_class, field, value):
    with pytest.raises(ConfigError) as caught:
        config_class(**{field: value})
    assert field in str(caught.value)


@pytest.mark.parametrize("bad", [dict(temperature_range=(float("nan"), 1.0)), dict(betas=(0.9, float("nan"))),
                                 dict(betas=(1.0, 0.999)), dict(epochs=2.5), dict(batch_size=True),
                                 dict(checkpoint_every=0), dict(steps_per_epoch=-3), dict(warmup_steps=-1)])
def test_other_out_of_range_config_values_are_refused(bad):
    with pytest.raises(ConfigError):
        Stage2Config(**bad)


def test_kill_between_the_checkpoint_renames_or_during_the_temp_write_resumes_exactly(tmp_path):
    model, bank, images, train = _setup()
    straight_model = make_model()
    Stage2Trainer(straight_model, bank, train, images, config=_config(tmp_path / "straight", epochs=2)).fit()
    straight = _last_weights(tmp_path / "straight")

    run = tmp_path / "run"
    Stage2Trainer(model, bank, train, images, config=_config(run)).fit()
    checkpoints = run / "checkpoints"
    # as if SIGKILL landed after `last` was moved aside and before the new folder was renamed in,
    # while a later save was still writing its temp folder
    (checkpoints / "last").rename(checkpoints / ".old-last-999")
    torn = checkpoints / ".tmp-last-888"
    torn.mkdir()
    good = (checkpoints / ".old-last-999" / "weights.safetensors").read_bytes()
    (torn / "weights.safetensors").write_bytes(good[: len(good) // 2])
    resumed_model = make_model()
    Stage2Trainer(resumed_model, bank, train, images, config=_config(run, epochs=2)).fit(resume=True)
    _assert_same(_last_weights(run), straight)


def test_a_cut_checkpoint_file_is_refused_not_half_read(tmp_path):
    from cir_plugins.errors import CheckpointError

    model, bank, images, train = _setup()
    Stage2Trainer(model, bank, train, images, config=_config(tmp_path)).fit()
    path = tmp_path / "checkpoints" / "last" / "weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        Stage2Trainer(model, bank, train, images, config=_config(tmp_path, epochs=2)).fit(resume=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_guard_equals_a_plain_isfinite_check(dtype):
    from cir_plugins.training.loop import non_finite_tensors

    generator = torch.Generator().manual_seed(7)
    sizes = [1, 3, 17, 255, 1031, 4099]
    largest = torch.finfo(dtype).max
    for trial in range(40):
        named = []
        for k, n in enumerate(sizes):
            t = (torch.randn(n, generator=generator) * 3).to(dtype)
            kind = int(torch.randint(0, 7, (1,), generator=generator))
            spots = torch.randint(0, n, (3,), generator=generator)
            if kind == 1:
                t[spots[0]] = float("nan")
            elif kind == 2:
                t[spots[0]] = float("inf")
            elif kind == 3:
                t[spots[0]] = float("-inf")
            elif kind == 4 and n > 1:  # +inf and -inf together: a naive sum would look like NaN, still bad
                t[spots[0]], t[(spots[0] + 1) % n] = float("inf"), float("-inf")
            elif kind == 5:  # every element at the dtype's largest finite value: finite, must pass
                t.fill_(largest)
            elif kind == 6:
                t.fill_(-largest)
            named.append((f"t{trial}.{k}", t))
        reference = [name for name, t in named if not bool(torch.isfinite(t).all())]
        assert non_finite_tensors(named) == reference
    assert non_finite_tensors([]) == []
