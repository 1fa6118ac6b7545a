"""A frozen reference side that reads the text too (``reference_uses_text``, e.g. SPRC's fusion pass):
the probe puts it on the target side, stage 2 caches it once per (reference id, text) pair and a step
never runs it, evaluation feeds it each query's own text, and a missing text is a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cir_plugins as cp
from cir_plugins.embedding import compose_triplets
from cir_plugins.errors import ModelProtocolError
from cir_plugins.protocol import parameter_split, reference_input, reference_uses_text


def _char_ids(texts):
    """texts -> (B, L) character codes (mod 32), padded with 0, and the (B, L) mask."""
    width = max(len(t) for t in texts)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, :len(text)] = torch.tensor([1 + ord(c) % 31 for c in text])
    return ids, (ids > 0).float()


class FusionToy(nn.Module):
    """Target: vision(image). Reference: fusion(vision(ref), frozen text words). Query: head(fused, text)."""

    reference_uses_text = True
    similarity = "dot"

    def __init__(self) -> None:
        super().__init__()
        self.vision = nn.Linear(12, 8)  # frozen: makes the bank and the fusion input
        self.fusion_words = nn.Embedding(32, 4)  # frozen: the text as the fusion pass reads it
        self.fusion = nn.Linear(12, 8)  # frozen fusion of (reference, text)
        self.query_words = nn.Embedding(32, 4)  # trained: the text as the query head reads it
        self.head = nn.Linear(12, 8)  # trained
        self.fusion_calls = 0

    @staticmethod
    def _bag(words: nn.Embedding, texts) -> torch.Tensor:
        ids, mask = _char_ids(texts)
        return (words(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, 4)

    def encode_image(self, images):
        return self.vision(images.flatten(1))  # (N, 12) -> (N, 8)

    def encode_reference(self, images, texts):
        self.fusion_calls += 1
        fused_in = torch.cat([self.vision(images.flatten(1)), self._bag(self.fusion_words, texts)], -1)  # (B, 12)
        return self.fusion(fused_in)  # (B, 8)

    def compose_query(self, fused, texts):
        return self.head(torch.cat([fused, self._bag(self.query_words, texts)], -1))  # (B, 12) -> (B, 8)


def _world(n=9):
    images = {f"im{k}": torch.randn(3, 2, 2) for k in range(n)}
    ids = list(images)
    triplets = [cp.Triplet(ids[k], (f"make it {c}", f"turn {c}"), ids[(k + 2) % n])
                for k, c in zip(range(n), ["red", "blue", "green"] * 3)]
    triplets.append(cp.Triplet(ids[0], ("make it red",), ids[5]))  # a (reference, text) pair seen twice
    return images, triplets


def test_probe_puts_the_text_reading_fusion_on_the_target_side():
    model = FusionToy()
    x = torch.randn(2, 3, 2, 2)
    assert reference_uses_text(model)
    split = parameter_split(model, x, ["a", "bb"], x)
    roots = lambda names: {n.split(".")[0] for n in names}  # noqa: E731
    assert roots(split.query) == {"query_words", "head"}
    assert roots(split.target) == {"vision", "fusion_words", "fusion"}
    report = cp.check_model(model, x, ["a", "bb"], x)
    assert report.ok, str(report)
    assert any("(image id, text) pair" in note for note in report.notes)


def test_reference_input_needs_the_texts_and_wrap_model_can_declare_the_flag():
    model = FusionToy()
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(ModelProtocolError, match="reads the texts"):
        reference_input(model, x)
    torch.testing.assert_close(reference_input(model, x, ["a", "b"]), model.encode_reference(x, ["a", "b"]))
    # a model that does not declare the flag is told by wrap_model; the default stays image-only
    plain = FusionToy()
    plain.reference_uses_text = False
    assert not reference_uses_text(plain)
    assert reference_uses_text(cp.wrap_model(plain, reference_uses_text=True))
    with pytest.raises(ValueError, match="reference_uses_text"):
        cp.wrap_model(plain, reference_uses_text="yes")


def test_stage2_caches_one_row_per_reference_and_text_and_never_runs_the_fusion():
    images, triplets = _world()
    model = FusionToy()
    bank = cp.NegativeBank.build(model, list(images), images, show_progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = cp.Stage2Config(epochs=2, batch_size=4, lr=1e-2, show_progress=False)
    trainer = cp.Stage2Trainer(model, bank, triplets, images, config=config)
    cache = trainer.reference_cache
    pairs = {(t.reference, text) for t in triplets for text in t.texts}
    assert set(cache.rows) == pairs and cache.features.shape == (len(pairs), 8)  # 18 distinct pairs, not 9 ids
    with torch.no_grad():  # each cached row is the fusion of that reference with that text
        for (ref, text), row in cache.rows.items():
            torch.testing.assert_close(cache.features[row], model.encode_reference(images[ref][None], [text])[0])
    calls_after_caching = model.fusion_calls
    trainer.fit()
    assert model.fusion_calls == calls_after_caching  # no step ran the fusion (or the vision tower)
    params = dict(model.named_parameters())
    for name in before:
        frozen = name.startswith(("vision", "fusion"))
        assert torch.equal(params[name], before[name]) == frozen, name
    # a lookup with another text than the cached ones is a clear error, not a silent wrong row
    with pytest.raises(ValueError, match="reference cache"):
        cache(["im0"], ["never seen"])


def test_evaluation_composes_with_each_querys_own_text():
    images, triplets = _world()
    model = FusionToy().eval()
    with torch.no_grad():
        got = compose_triplets(model, images, triplets, batch_size=4, device=torch.device("cpu"))
        texts = [t.texts[0] for t in triplets]
        pixels = torch.stack([images[t.reference] for t in triplets])
        expected = model.compose_query(model.encode_reference(pixels, texts), texts)
    torch.testing.assert_close(got, expected)
