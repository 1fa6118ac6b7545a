import pytest
import torch
from torch import nn

import cir_plugins as cp
from cir_plugins.errors import ConfigError, ModelProtocolError
from cir_plugins.protocol import WrappedModel, parameter_split, reference_input, similarity_of, target_fingerprint

D = 8


class TextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.EmbeddingBag(50, D)

    def forward(self, texts):
        ids = [torch.tensor([hash(w) % 50 for w in t.split()]) for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.embed(torch.cat(ids), offsets)


class Toy(nn.Module):
    """Image tower shared by reference and target; text tower and fusion on the query side only."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, D))
        self.bn = nn.BatchNorm1d(D)
        self.text = TextEncoder()
        self.fusion = nn.Linear(2 * D, D)
        self.unused = nn.Linear(2, 2)

    def image_features(self, images):
        return self.bn(self.vision(images))

    def encode_image(self, images):
        return self.image_features(images)

    def compose_query(self, reference, texts):
        image = self.image_features(reference)
        return self.fusion(torch.cat([image, self.text(texts)], dim=-1))


class ToyWithReference(Toy):
    def encode_reference(self, images):
        return self.image_features(images)

    def compose_query(self, reference, texts):
        return self.fusion(torch.cat([reference, self.text(texts)], dim=-1))


def batch(n=3):
    return torch.randn(n, 3, 4, 4), [f"make it {c}" for c in ["red", "blue", "tall", "round"][:n]]


def test_conforming_model_is_returned_as_is():
    model = Toy()
    assert cp.wrap_model(model) is model
    assert isinstance(model, cp.CIRModel)


def test_probe_split_finds_query_and_target_sides():
    model = Toy()
    images, texts = batch()
    split = parameter_split(model, images, texts, images)
    assert set(split.target) == {"vision.1.weight", "vision.1.bias", "bn.weight", "bn.bias"}
    assert set(split.query) == {"text.embed.weight", "fusion.weight", "fusion.bias"}
    assert set(split.unused) == {"unused.weight", "unused.bias"}
    # the probe leaves no trace: no .grad, modes and BN statistics unchanged
    assert all(p.grad is None for p in model.parameters())
    assert model.training and torch.equal(model.bn.running_mean, torch.zeros(D))
    counts = split.counts(model)
    assert counts["query"] == 50 * D + 2 * D * D + D


def test_probe_with_encode_reference_freezes_reference_side():
    model = ToyWithReference()
    images, texts = batch()
    split = parameter_split(model, images, texts, images)
    assert "vision.1.weight" in split.target and "fusion.weight" in split.query
    trainable = split.apply(model)
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not model.vision[1].weight.requires_grad
    # an already-frozen parameter counts as unused
    split2 = parameter_split(model, images, texts, images)
    assert "vision.1.weight" in split2.unused and "fusion.weight" in split2.query


def test_wrap_model_with_method_names_and_forwarding():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Toy()
            self.tag = "raw"

        def img(self, x):
            return self.inner.encode_image(x)

        def query(self, ref, texts):
            return self.inner.compose_query(ref, texts)

    raw = Raw()
    wrapped = cp.wrap_model(raw, compose_query="query", encode_image="img")
    assert isinstance(wrapped, WrappedModel) and wrapped.tag == "raw" and wrapped.inner is raw.inner
    assert not hasattr(wrapped, "encode_reference")
    images, texts = batch()
    assert wrapped.compose_query(images, texts).shape == (3, D)
    assert similarity_of(wrapped) == "dot"
    assert reference_input(wrapped, images) is images
    split = parameter_split(wrapped, images, texts, images)
    assert "model.inner.fusion.weight" in split.query and "model.inner.vision.1.weight" in split.target


def test_wrap_model_trainable_override_forms():
    images, texts = batch()
    for spec in (["fusion"], lambda name, p: name.startswith("fusion"), list(Toy().fusion.parameters())):
        model = Toy()
        if not isinstance(spec, (list,)) or isinstance(spec[0], str):
            wrapped = cp.wrap_model(model, trainable=spec)
        else:
            wrapped = cp.wrap_model(model, trainable=list(model.fusion.parameters()))
        split = parameter_split(wrapped, images, texts, images)
        assert set(split.query) == {"model.fusion.weight", "model.fusion.bias"}, spec
        assert split.how == "override"
    with pytest.raises(ConfigError, match="match no parameter"):
        parameter_split(cp.wrap_model(Toy(), trainable=["nope"]), images, texts, images)


def test_wrap_model_errors_name_the_problem():
    with pytest.raises(ModelProtocolError, match="compose_query"):
        cp.wrap_model(nn.Linear(2, 2), encode_image="forward")
    with pytest.raises(ModelProtocolError, match="does not name a method"):
        cp.wrap_model(Toy(), compose_query="nonexistent")
    with pytest.raises(ConfigError, match="similarity"):
        cp.wrap_model(Toy(), similarity="cosine")


def test_check_model_passes_on_a_good_model():
    images, texts = batch()
    report = cp.check_model(ToyWithReference(), images, texts, images)
    assert report.ok, str(report)
    assert report.trainable_parameters > 0 and report.frozen_parameters > 0
    assert report.query_shape == (3, D) and report.image_shape == (3, D)
    assert "OK" in str(report)


@pytest.mark.parametrize("defect, words", [
    ("rank", "rank"),
    ("batch", "rows for a batch"),
    ("nan", "NaN"),
    ("int", "floating-point"),
    ("dim", "dimension"),
    ("nograd", "does not require grad"),
    ("multivector_dot", "multi-vector"),
    ("all_shared", "no parameter is on the query side"),
])
def test_check_model_names_each_problem(defect, words):
    class Broken(Toy):
        def encode_image(self, images):
            out = super().encode_image(images)
            if defect == "rank":
                return out[None, None]
            if defect == "int":
                return out.long()
            if defect == "multivector_dot":
                return out[:, None, :].expand(-1, 2, -1)
            return out

        def compose_query(self, reference, texts):
            out = super().compose_query(reference, texts)
            if defect == "batch":
                return out[:1]
            if defect == "nan":
                return out * float("nan")
            if defect == "dim":
                return out[:, :-1]
            if defect == "nograd":
                return out.detach()
            if defect == "all_shared":
                return self.image_features(reference)
            return out

    images, texts = batch()
    report = cp.check_model(Broken(), images, texts, images)
    assert not report.ok
    assert any(words in p for p in report.problems), report.problems
    with pytest.raises(ModelProtocolError):
        report.raise_if_failed()


def test_check_model_reports_missing_methods_and_user_exceptions():
    images, texts = batch()
    with pytest.raises(ModelProtocolError, match="Linear has no encode_image and no compose_query.*wrap_model"):
        cp.check_model(nn.Linear(2, 2), images, texts, images)

    class Raises(Toy):
        def compose_query(self, reference, texts):
            raise RuntimeError("boom")

    with pytest.raises(ModelProtocolError, match="RuntimeError: boom"):
        cp.check_model(Raises(), images, texts, images)


def test_target_fingerprint_tracks_target_weights_only():
    model = Toy()
    images, texts = batch()
    split = parameter_split(model, images, texts, images)
    before = target_fingerprint(model, split)
    with torch.no_grad():
        model.fusion.weight.add_(1.0)
    assert target_fingerprint(model, split) == before
    with torch.no_grad():
        model.bn.running_mean.add_(1.0)
    assert target_fingerprint(model, split) != before
    other = Toy()
    assert target_fingerprint(other, split) != before
