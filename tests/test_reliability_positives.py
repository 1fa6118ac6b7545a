"""Reliability of triplet generation: non-finite pair embeddings name the images; a generated text
over the length limit is cut (or replaced) and warned about once, the rest counted."""

from __future__ import annotations

import logging

import pytest
import torch

from cir_plugins.errors import NonFiniteError
from cir_plugins.positives.pairing import embed_images
from cir_plugins.positives.templates import TextMaker


def test_non_finite_pair_embeddings_name_only_the_bad_images():
    images = {f"im{k}": torch.full((3, 2, 2), float(k)) for k in range(7)}
    images["im4"] = torch.full((3, 2, 2), float("nan"))

    def encoder(batch):  # (n, 3, 2, 2) -> (n, 5); im5 overflows to inf
        out = batch.flatten(1)[:, :5].clone()
        out[batch.flatten(1)[:, 0] == 5.0] = float("inf")
        return out

    with pytest.raises(NonFiniteError) as caught:
        embed_images(encoder, list(images), images, batch_size=3)
    message = str(caught.value)
    assert "im4" in message  # the first bad batch (im3..im5) is named, its good image is not
    assert "im3" not in message and "Fix:" in message


def test_over_long_generated_text_is_fitted_and_warned_once(caplog):
    maker = TextMaker(templates=["{target} instead of {reference}"], max_tokens=4, fallback="truncate")
    with caplog.at_level(logging.WARNING, logger="cir_plugins.positives.templates"):
        outputs = [maker("a long red dress with sleeves", f"a short blue shirt number {k}") for k in range(5)]
    assert all(len(text.split()) <= 4 for out in outputs for _, text in out)
    assert maker.fallbacks_used == 5
    warned = [r for r in caplog.records if "max_tokens=4" in r.getMessage()]
    assert len(warned) == 1
    fits = TextMaker(templates=["{target}"], max_tokens=4)
    with caplog.at_level(logging.WARNING, logger="cir_plugins.positives.templates"):
        caplog.clear()
        fits("red", "blue")
    assert caplog.records == [] and fits.fallbacks_used == 0
