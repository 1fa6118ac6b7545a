"""Reliability of triplet generation: non-finite pair embeddings name the images; a generated text
over the length limit is cut (or replaced) and warned about once, the rest counted."""

from __future__ import annotations

import logging

import pytest
import torch

from cir_plugins.embedding import embed_images  # the one embedding loop
from cir_plugins.errors import NonFiniteError
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


def test_pair_embedding_accepts_a_skip_mode_image_store_and_names_an_unreadable_image(tmp_path):
    from PIL import Image

    from cir_plugins.data.images import ImageStore
    from cir_plugins.errors import ImageLoadError

    for k in range(5):
        Image.new("RGB", (6, 5), (40 * k, 10, 200 - 30 * k)).save(tmp_path / f"i{k}.png")
    paths = {f"i{k}": f"i{k}.png" for k in range(5)}

    def encoder(batch):
        return batch.flatten(1)[:, :7]  # (n, 7)

    strict = embed_images(encoder, list(paths), ImageStore(tmp_path, paths, "none"), batch_size=2)
    lenient = embed_images(encoder, list(paths), ImageStore(tmp_path, paths, "none", on_error="skip"), batch_size=2)
    assert torch.equal(strict, lenient)  # skip mode still gives one row per id, in order
    (tmp_path / "bad.png").write_bytes(b"")
    store = ImageStore(tmp_path, {**paths, "bad": "bad.png"}, "none", on_error="skip")
    with pytest.raises(ImageLoadError, match="'bad'"):
        embed_images(encoder, store.ids, store, batch_size=2)
    # the documented skip route: drop unreadable ids first (logged), then embed
    kept = store.readable_ids()
    assert kept == list(paths) and torch.equal(embed_images(encoder, kept, store, batch_size=2), strict)
