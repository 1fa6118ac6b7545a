"""The SPRC-style BLIP-2 example (examples/blip2_sprc): loaded by path from a tiny saved checkpoint,
checked against transformers' own retrieval head, wrapped in <= 10 lines, trained in stage 2
without ever running the vision tower or the fusion pass, and run end to end (augment -> stage 2 ->
evaluate). The release-fidelity checks (what trains, optimiser, text length, preprocessing) are in
tests/examples/test_sprc_fidelity.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

import cir_plugins as cp
from cir_plugins.protocol import parameter_split

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "blip2_sprc"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _example_helpers import check_integration_files, random_images, run_readme_commands  # noqa: E402

from examples.blip2_sprc import run as blip2_run  # noqa: E402
from examples.blip2_sprc.model import SPRCRetriever, make_tiny_checkpoint  # noqa: E402
from examples.blip2_sprc.wrap import load  # noqa: E402

# the dev box's 2 cores are shared: one intra-op thread avoids oversubscription stalls
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("blip2_tiny"), blip2_run.WORLD_WORDS)


@pytest.fixture()
def model(checkpoint):
    return load(str(checkpoint))


def test_wrapping_code_is_at_most_10_lines_and_quoted_in_readme():
    check_integration_files(EXAMPLE)


def test_loads_by_path_and_passes_check_model(model, checkpoint):
    assert isinstance(model.model, SPRCRetriever)
    assert model.similarity == "max_token"
    imgs = random_images(3)
    x = torch.stack(list(imgs.values()))
    report = cp.check_model(model, x[:2], ["make it red", "add a small blue star at the top"], x)
    assert report.ok, str(report)
    assert report.image_shape == (3, 32, 256)  # (N, 32 query tokens, 256)
    assert report.query_shape == (2, 256)
    assert report.reference_shape == (2, 32, 32)  # the frozen fusion pass's prompt: 32 query outputs of width 32
    # the stage-2 split: a copy of the Q-Former (with its text embeddings) + text projection
    split = parameter_split(model, x[:2], ["make it red", "add a star"], x)
    roots = {".".join(n.split(".")[1:3]) if n.startswith("model.blip.") else n.split(".")[1] for n in split.query}
    assert roots == {"query_qformer", "query_embeddings", "blip.text_projection"}
    target_roots = {".".join(n.split(".")[1:3]) for n in split.target}
    assert target_roots == {"blip.vision_model", "blip.qformer", "blip.query_tokens", "blip.vision_projection",
                            "blip.embeddings"}  # the fusion pass (original Q-Former + its embeddings) is frozen
    # the copy's cross-attention and query feed-forward are never reached by the image-free pass
    assert not any(part in n for n in split.query for part in ("crossattention", "intermediate_query"))
    # the copy starts equal to the original but is a separate tensor
    for (name, a), (_, b) in zip(model.blip.qformer.named_parameters(), model.query_qformer.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name


def test_gallery_tokens_match_transformers_retrieval_head(model):
    """image_tokens == Blip2ForImageTextRetrieval's own ITC image embeddings (32 x 256 per image)."""
    x = torch.stack(list(random_images(5).values()))
    batch = model.tokenizer(["a red circle", "blue"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.image_tokens(x)
        theirs = model.blip(pixel_values=x, input_ids=batch["input_ids"][:1].expand(5, -1),
                            attention_mask=batch["attention_mask"][:1].expand(5, -1),
                            use_image_text_matching_head=False).image_embeds
    assert ours.shape == (5, 32, 256)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_query_takes_the_sprc_route(model):
    """Fusion pass on the original Q-Former: cross-attention + query FFN + text FFN; image-free pass on
    the copy: text FFN only (query_length=0), no vision tower, no original Q-Former."""
    calls: dict[str, int] = {}

    def counter(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = []
    for owner, qformer in (("copy", model.query_qformer), ("original", model.blip.qformer)):
        for i, layer in enumerate(qformer.encoder.layer):
            for part in ("crossattention", "intermediate_query", "intermediate"):
                handles.append(getattr(layer, part).register_forward_hook(counter(f"{owner}.{i}.{part}")))
    handles.append(model.blip.vision_model.register_forward_hook(counter("vision")))
    texts = ["make it red", "move the star to the left"]
    n_layers = len(model.query_qformer.encoder.layer)
    try:
        prompt = model.encode_reference(torch.stack(list(random_images(2).values())), texts)
        fusion_calls, _ = dict(calls), calls.clear()
        model.compose_query(prompt, texts)
    finally:
        for h in handles:
            h.remove()
    assert prompt.shape == (2, 32, 32)
    expected_fusion = {"vision": 1}
    for i in range(n_layers):
        expected_fusion.update({f"original.{i}.crossattention": 1, f"original.{i}.intermediate_query": 1,
                                f"original.{i}.intermediate": 1})
    assert fusion_calls == expected_fusion  # the fusion pass never touches the copy
    assert calls == {f"copy.{i}.intermediate": 1 for i in range(n_layers)}  # image-free, text FFN only


def test_query_is_per_example_with_padding_and_uses_both_inputs(model):
    features = torch.randn(3, 32, 32, dtype=torch.float32)  # a prompt (B, 32, H)
    texts = ["red", "make the large circle a small blue star", "add a cube"]
    with torch.no_grad():
        batched = model.compose_query(features, texts)
        alone = torch.cat([model.compose_query(features[i:i + 1], [texts[i]]) for i in range(3)])
        other_text = model.compose_query(features, ["green"] * 3)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)  # padding is masked out
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(3))
    assert (batched - other_text).abs().amax(-1).min() > 1e-4
    # the reference reaches every query (a random tiny model reads it weakly, so test the gradient)
    features.requires_grad_(True)
    query = model.compose_query(features, texts)
    (grad,) = torch.autograd.grad(query.sum(), features)
    assert (grad.abs().flatten(1).amax(1) > 0).all()


def test_stage2_bank_is_multi_vector_and_never_runs_the_vision_tower_or_the_fusion(model):
    imgs = random_images(13)
    ids = list(imgs)
    triplets = [cp.Triplet(ids[k], (f"make it {c}",), ids[(k + 3) % 13])
                for k, c in zip(range(13), ["red", "blue", "green"] * 5)]
    bank = cp.NegativeBank.build(model, ids, imgs, batch_size=5, show_progress=False)
    assert tuple(bank.embeddings.shape) == (13, 32, 256)
    assert bank.similarity == "max_token"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bank_before = bank.embeddings.clone()
    config = cp.Stage2Config(epochs=1, batch_size=5, lr=1e-3, temperature=0.05, learn_temperature=True,
                             show_progress=False)
    trainer = cp.Stage2Trainer(model, bank, triplets, imgs, config=config)
    vision_calls = []
    handles = [model.blip.vision_model.register_forward_hook(lambda *_: vision_calls.append("vision")),
               model.blip.qformer.register_forward_hook(lambda *_: vision_calls.append("fusion"))]
    try:
        history = trainer.fit()
    finally:
        for handle in handles:
            handle.remove()
    assert vision_calls == []  # every step composed from the cached fusion prompts
    assert history[-1]["steps"] >= 2
    assert history[-1]["temperature"] != pytest.approx(0.05, abs=1e-9)  # the learnable tau moved
    assert torch.equal(bank.embeddings, bank_before)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = [n for n in before if n.startswith(("model.blip.vision_model", "model.blip.qformer",
                                                 "model.blip.query_tokens", "model.blip.vision_projection",
                                                 "model.blip.embeddings"))]
    assert frozen and not changed & set(frozen)
    assert any(n.startswith("model.query_qformer") for n in changed)
    assert any(n.startswith("model.blip.text_projection") for n in changed)


@pytest.mark.slow
def test_one_augment_stage2_evaluate_cycle(checkpoint, tmp_path):
    args = argparse.Namespace(
        model=str(checkpoint), world=str(tmp_path / "world"), world_size="tiny", data=None, out=str(tmp_path / "run"),
        epochs=1, batch_size=16, lr=1e-4, steps_per_epoch=3, seed=0, progress=False)
    results = blip2_run.cycle(args)
    assert results["bank_shape"] == [168, 32, 256]  # every train image of the tiny world, 32 tokens
    assert results["triplets"]["total"] > results["triplets"]["annotated"] == 24  # generated positives added
    for when in ("before", "after"):
        assert set(results[when]) >= {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rmean"}
        assert all(0.0 <= v <= 100.0 for v in results[when].values())
    assert (tmp_path / "run" / "results.json").is_file()
    assert (tmp_path / "run" / "bank.safetensors").is_file()


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    run_readme_commands(EXAMPLE, tmp_path)


def test_bad_inputs_get_clear_errors(model):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    config = Blip2Config(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=8),
                         qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, encoder_hidden_size=16, vocab_size=40))
    with pytest.raises(ValueError, match="use_qformer_text_input"):  # an image-only Q-Former has no text FFN
        SPRCRetriever(Blip2ForImageTextRetrieval(config), model.tokenizer)
    with pytest.raises(ValueError, match=r"\(B, 32, 32\) from fusion_prompt and B texts"):
        model.compose_query(torch.randn(2, 32, 32), ["only one text"])
    with pytest.raises(ValueError, match=r"\(B, 32, 32\) from fusion_prompt"):  # raw vision features are refused
        model.compose_query(torch.randn(2, 17, 32), ["a", "b"])
