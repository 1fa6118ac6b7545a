"""The shared small helpers: eval-mode switching, device lookup, atomic writes, image embedding, trainable names."""

from __future__ import annotations

import os

import pytest
import torch
from _toy import make_model, make_world
from torch import nn

from cir_plugins import _atomic, embedding, protocol
from cir_plugins._utils import eval_mode, model_device
from cir_plugins.errors import ConfigError, DataError, ModelProtocolError, NonFiniteError
from cir_plugins.training import Stage1Config, Stage1Trainer


def test_eval_mode_restores_each_modules_own_flag_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a frozen batch-norm deliberately in eval mode inside a training model
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]
    with eval_mode(object()) as same:  # not a module: passes through
        assert isinstance(same, object)


def test_model_device_reads_parameters_then_buffers():
    class BufferOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.zeros(1, device="meta"))

    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(BufferOnly()) == torch.device("cpu")  # meta -> the default
    assert model_device(BufferOnly(), default=None) is None
    assert model_device(object()) == torch.device("cpu")


def test_atomic_write_bytes_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    _atomic.atomic_write_bytes(path, b"one")
    _atomic.atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(os.listdir(path.parent)) == ["f.bin"]
    with pytest.raises(FileNotFoundError):
        _atomic.atomic_write_bytes(tmp_path / "missing" / "g.bin", b"x", make_parents=False)
    _atomic.atomic_write_json(path, {"é": 1}, indent=1, ensure_ascii=False, trailing_newline=True)
    assert path.read_text(encoding="utf-8") == '{\n "é": 1\n}\n'


def test_embed_images_equals_a_plain_loop_and_checks_inputs():
    images = {f"i{k}": torch.randn(3, 2, 2) for k in range(7)}
    ids = ["i3", "i0", "i6", "i1", "i2"]
    weight = torch.randn(12, 3, 5)  # (in, T, D): a multi-vector encoder

    def encoder(x):
        return torch.einsum("ni,itd->ntd", x.flatten(1), weight)  # (n, 3, 5)

    reference = torch.stack([encoder(images[i][None])[0] for i in ids])  # one image at a time
    out = embedding.embed_images(encoder, ids, images, batch_size=2, show_progress=False)
    assert out.shape == (5, 3, 5) and torch.allclose(out, reference, atol=1e-6)
    pooled = embedding.embed_images(encoder, ids, images, batch_size=3, pool_tokens=True, show_progress=False)
    assert torch.allclose(pooled, reference.mean(dim=1), atol=1e-6)
    with pytest.raises(DataError, match="nope"):
        embedding.embed_images(encoder, ["i0", "nope"], images, show_progress=False)
    with pytest.raises(ModelProtocolError, match="one row per image"):
        embedding.embed_images(lambda x: x[:1], ids, images, show_progress=False)
    with pytest.raises(NonFiniteError, match="i0"):
        embedding.embed_images(lambda x: x.flatten(1) / 0.0 * 0.0, ["i0"], images, show_progress=False)
    assert embedding.embed_images(encoder, [], images, show_progress=False).shape == (0, 0)


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fuse = nn.Linear(2, 2)
        self.fuser = nn.Linear(2, 2)
        self.image = nn.Linear(2, 2)

    def encode_image(self, x):
        return self.image(x)

    def compose_query(self, r, texts):
        return self.fuse(r) + self.fuser(r)


@pytest.mark.parametrize("wrapped", [False, True])
def test_select_trainable_one_rule(wrapped):
    inner = _Inner()
    model = protocol.wrap_model(inner, similarity="dot") if wrapped else inner
    prefix = "model." if wrapped else ""
    assert protocol.select_trainable(model, ["fuse"]) == (f"{prefix}fuse.weight", f"{prefix}fuse.bias")
    assert protocol.select_trainable(model, ["fuse."]) == (f"{prefix}fuse.weight", f"{prefix}fuse.bias")
    assert protocol.select_trainable(model, [f"{prefix}fuser.bias"]) == (f"{prefix}fuser.bias",)
    assert protocol.select_trainable(model, lambda name, p: name.startswith("image")) == \
        (f"{prefix}image.weight", f"{prefix}image.bias")  # the predicate sees the user's own names
    assert protocol.select_trainable(model, [inner.fuse.bias]) == (f"{prefix}fuse.bias",)
    with pytest.raises(ConfigError, match="fus'"):
        protocol.select_trainable(model, ["fus"])  # a prefix must end at a dot
    with pytest.raises(ConfigError, match="foreign"):
        protocol.select_trainable(model, [nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match="selects no parameter"):
        protocol.select_trainable(model, lambda name, p: False)


def test_stage1_and_wrap_model_resolve_trainable_names_alike():
    images, train, _ = make_world(n_train=16)
    spec = ["fuse", "text."]
    wrapped = protocol.wrap_model(make_model(), trainable=spec)
    split = protocol.parameter_split(wrapped, torch.zeros(1, 3, 4, 4), ["red"], torch.zeros(1, 3, 4, 4))
    trainer = Stage1Trainer(wrapped, train, images, trainable=spec,
                            config=Stage1Config(epochs=1, batch_size=16, show_progress=False))
    assert tuple(name for name, _ in trainer.trainable) == split.query
    assert split.query == ("model.text.weight", "model.fuse.weight", "model.fuse.bias")
