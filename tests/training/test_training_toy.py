"""The toy model and world themselves (tests/_toy.py, served by the toy_model / toy_world fixtures)."""

import torch


def test_toy_world_targets_are_in_the_gallery(toy_world):
    images, train, val = toy_world()
    assert all(t.target in images and t.reference in images and t.target != t.reference for t in train + val)
    assert len({t.target for t in train}) > 20


def test_toy_model_shapes(toy_model):
    model = toy_model(tokens_per_image=3)
    x = torch.randn(5, 3, 4, 4)
    assert model.encode_image(x).shape == (5, 3, 16)
    assert model.compose_query(model.encode_reference(x), ["red"] * 5).shape == (5, 16)
