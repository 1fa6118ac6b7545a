"""The SPRC example follows the method's SPRC row (docs/method.md section 3): in stage 2 only the copy of the
Q-Former that runs the image-free pass, the text projection and the temperature train; the fusion pass
(original Q-Former + its text embeddings), the query tokens and the vision tower stay bit-identical; the
fusion output is cached per (reference id, text); AdamW betas (0.9, 0.98) and weight decay 0.05; texts
cut at 32 tokens; targetpad preprocessing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cir_plugins as cp

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _example_helpers import random_images  # noqa: E402

from examples.blip2_sprc import run as blip2_run  # noqa: E402
from examples.blip2_sprc.model import make_tiny_checkpoint  # noqa: E402
from examples.blip2_sprc.wrap import load  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FROZEN = ("model.blip.vision_model.", "model.blip.qformer.", "model.blip.embeddings.", "model.blip.query_tokens",
          "model.blip.vision_projection.")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("sprc_tiny"), blip2_run.WORLD_WORDS)


def _world(n=10):
    imgs = random_images(n)
    ids = list(imgs)
    triplets = [cp.Triplet(ids[k], (f"make it {c}", f"unlike it, i want {c}"), ids[(k + 3) % n])
                for k, c in zip(range(n), ["red", "blue", "green"] * 4)]
    return imgs, triplets


def test_stage2_keeps_the_fusion_qformer_and_vision_tower_bit_identical_while_the_copy_trains(checkpoint):
    model = load(str(checkpoint))
    imgs, triplets = _world()
    bank = cp.NegativeBank.build(model, list(imgs), imgs, batch_size=5, show_progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = cp.Stage2Config(epochs=2, batch_size=5, lr=1e-3, show_progress=False,
                             **blip2_run.SPEC.stage2)
    trainer = cp.Stage2Trainer(model, bank, triplets, imgs, config=config)
    history = trainer.fit()

    params = dict(model.named_parameters())
    frozen = [n for n in params if n.startswith(FROZEN)]
    assert len(frozen) > 50 and any(n.startswith("model.blip.qformer.") for n in frozen)
    for name in frozen:  # bit-identical: fusion Q-Former, its embeddings, query tokens, vision tower, vision proj
        assert torch.equal(params[name], before[name]), name
        assert not params[name].requires_grad, name
    changed = {n for n in params if not torch.equal(params[n], before[n])}
    assert any(n.startswith("model.query_qformer.") for n in changed)  # the copy trained
    assert any(n.startswith("model.query_embeddings.") for n in changed)
    assert {"model.blip.text_projection.weight", "model.blip.text_projection.bias"} <= changed
    assert history[-1]["temperature"] != pytest.approx(0.05, abs=1e-9)  # the learnable tau moved
    # the copy no longer equals the frozen original it started from
    assert not all(torch.equal(a, b) for a, b in zip(model.query_qformer.parameters(), model.blip.qformer.parameters()))


def test_stage2_caches_the_fusion_prompt_per_reference_and_text(checkpoint):
    model = load(str(checkpoint))
    imgs, triplets = _world(6)
    bank = cp.NegativeBank.build(model, list(imgs), imgs, batch_size=6, show_progress=False)
    config = cp.Stage2Config(epochs=1, batch_size=6, show_progress=False, **blip2_run.SPEC.stage2)
    trainer = cp.Stage2Trainer(model, bank, triplets, imgs, config=config)
    cache = trainer.reference_cache
    pairs = {(t.reference, text) for t in triplets for text in t.texts}
    assert set(cache.rows) == pairs
    assert tuple(cache.features.shape) == (len(pairs), 32, 32)  # (pairs, 32 query outputs, H): no vision features
    ref, text = sorted(pairs)[0]
    with torch.no_grad():
        direct = model.fusion_prompt(imgs[ref][None], [text])[0]
    torch.testing.assert_close(cache.features[cache.rows[(ref, text)]], direct)


def test_optimiser_is_sprcs_adamw(checkpoint):
    model = load(str(checkpoint))
    imgs, triplets = _world(5)
    bank = cp.NegativeBank.build(model, list(imgs), imgs, show_progress=False)
    config = cp.Stage2Config(epochs=1, batch_size=5, show_progress=False, **blip2_run.SPEC.stage2)
    trainer = cp.Stage2Trainer(model, bank, triplets, imgs, config=config)
    weights = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert tuple(weights["betas"]) == (0.9, 0.98) and weights["weight_decay"] == 0.05
    assert config.temperature == 0.05 and config.learn_temperature


def test_texts_are_cut_at_32_tokens(checkpoint):
    model = load(str(checkpoint))
    assert model.max_text_length == 32
    long_text = " ".join(["red"] * 60)
    ids, mask = model._tokenize([long_text, "blue"], torch.device("cpu"))
    assert ids.shape == (2, 32) and int(mask[0].sum()) == 32


def test_images_are_targetpadded_not_plainly_resized(checkpoint):
    model = load(str(checkpoint))
    transform = blip2_run.SPEC.transform(model)
    assert (transform.kind, transform.size, transform.target_ratio) == ("targetpad", 32, 1.25)
    # a 4:1 image, red on the left, blue on the right: targetpad keeps both halves and pads above/below
    wide = np.zeros((16, 64, 3), dtype=np.uint8)
    wide[:, :32, 0] = 255
    wide[:, 32:, 2] = 255
    x = transform(Image.fromarray(wide))
    mean = torch.tensor(transform.mean)[:, None]
    std = torch.tensor(transform.std)[:, None]
    black = (0 - mean) / std  # a padded (black) pixel after normalisation, (3, 1)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[:, 0, :], black.expand(3, 32), atol=1e-5, rtol=0)  # top row is padding
    assert x[0, 16, 2] > x[2, 16, 2] and x[2, 16, -3] > x[0, 16, -3]  # red left edge and blue right edge survive


def test_texts_get_sprcs_caption_cleaning(checkpoint):
    from examples.blip2_sprc.model import clean_caption

    assert clean_caption('Make it RED!!  (and "shiny"): now~') == "make it red and shiny now"
    assert clean_caption(" ".join(f"w{k}" for k in range(60))) == " ".join(f"w{k}" for k in range(50))
    model = load(str(checkpoint))
    noisy, plain = model._tokenize(["Make it RED!! (now)"], torch.device("cpu")), \
        model._tokenize(["make it red now"], torch.device("cpu"))
    assert torch.equal(noisy[0], plain[0])
    model.model.clean_texts = False  # the option that turns it off keeps the punctuation
    assert not torch.equal(model._tokenize(["Make it RED!! (now)"], torch.device("cpu"))[0], plain[0])
