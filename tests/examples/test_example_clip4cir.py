"""The CLIP4Cir example: model file, wrapping, and one augment -> stage-2 -> evaluate cycle on the
synthetic world with a tiny CLIP saved to disk and loaded back by path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
for path in (str(EXAMPLES), str(EXAMPLES / "clip4cir")):
    if path not in sys.path:
        sys.path.insert(0, path)

import _tiny_clip  # noqa: E402
import model as clip4cir_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIP checkpoint directory (config, safetensors, tokenizer, image processor)."""
    vocabulary = _tiny_clip.words_of(["a large red circle at the top left and a small blue square in the centre",
                                      "make it green", "remove the star"])
    return _tiny_clip.save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", vocabulary, seed=0,
                                     image_size=24, patch_size=8, width=32, projection_dim=16)


def test_model_file_does_not_import_the_library():
    source = (EXAMPLES / "clip4cir" / "model.py").read_text()
    assert "cir_plugins" not in source.replace("does not import ``cir_plugins``", "")


def test_features_of_accepts_tensor_and_output_object():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = torch.randn(3, 5)
    assert clip4cir_model.features_of(x) is x  # transformers 4.x: the tensor itself
    out = BaseModelOutputWithPooling(last_hidden_state=torch.randn(3, 2, 5), pooler_output=x)
    assert clip4cir_model.features_of(out) is x  # 5.x: pooler_output holds the projected features
    assert clip4cir_model.features_of((torch.randn(3, 2, 5), x)) is x  # return_dict=False tuple
    with pytest.raises(TypeError, match="pooler_output"):
        clip4cir_model.features_of({"logits": x})


def _combiner_reference(c: clip4cir_model.Combiner, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """docs/method.md section 4 written out step by step (eval mode: dropout is identity)."""
    tp = torch.relu(text @ c.text_projection.weight.T + c.text_projection.bias)
    ip = torch.relu(image @ c.image_projection.weight.T + c.image_projection.bias)
    joint = torch.cat([tp, ip], dim=1)
    hidden = torch.relu(joint @ c.combiner_layer.weight.T + c.combiner_layer.bias)
    mlp = hidden @ c.output_layer.weight.T + c.output_layer.bias
    g1, _, _, g2, _ = c.gate
    lam = torch.sigmoid(torch.relu(joint @ g1.weight.T + g1.bias) @ g2.weight.T + g2.bias)
    out = mlp + lam * text + (1 - lam) * image
    return out / out.norm(dim=1, keepdim=True)


def test_combiner_matches_the_method_description_at_odd_sizes():
    torch.manual_seed(1)
    for dim, batch in ((7, 5), (13, 3)):
        combiner = clip4cir_model.Combiner(dim).double().eval()
        assert combiner.text_projection.out_features == 4 * dim and combiner.combiner_layer.out_features == 8 * dim
        image, text = torch.randn(batch, dim, dtype=torch.float64), torch.randn(batch, dim, dtype=torch.float64)
        torch.testing.assert_close(combiner(image, text), _combiner_reference(combiner, image, text))


def test_loaded_by_path_encodes_and_composes(tiny_clip_dir):
    model = clip4cir_model.CLIP4Cir.from_pretrained(str(tiny_clip_dir), fusion="sum").eval()
    assert model.preprocess == {"size": 24, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    images = torch.randn(5, 3, 24, 24)
    with torch.no_grad():
        reference = model.encode_reference(images)
        targets = model.encode_image(images)
        query = model.compose_query(reference, ["make it green"] * 5)
    assert reference.shape == targets.shape == query.shape == (5, 16)
    torch.testing.assert_close(targets, F.normalize(reference, dim=-1))
    with torch.no_grad():  # sum fusion = normalize(image + text), text from the CLIP text tower
        text = model.text_features(["make it green"] * 5)
    torch.testing.assert_close(query, F.normalize(reference + text, dim=-1))
    torch.testing.assert_close(query.norm(dim=-1), torch.ones(5))


def test_truncates_at_the_tokenizers_limit_and_keeps_eos(tiny_clip_dir):
    model = clip4cir_model.CLIP4Cir.from_pretrained(str(tiny_clip_dir), fusion="combiner").eval()
    assert model.max_length == 32
    tokens = model.tokenize(["red " * 100, "green"])
    assert tokens["input_ids"].shape == (2, 32)
    assert int(tokens["input_ids"][0, -1]) == model.tokenizer.eos_token_id
    with torch.no_grad():  # a text longer than the position table still encodes
        out = model.compose_query(model.encode_reference(torch.randn(2, 3, 24, 24)), ["red " * 100, "green"])
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_unknown_fusion_is_refused(tiny_clip_dir):
    with pytest.raises(ValueError, match="fusion"):
        clip4cir_model.CLIP4Cir.from_pretrained(str(tiny_clip_dir), fusion="concat")


def test_combiner_weights_round_trip(tiny_clip_dir, tmp_path):
    model = clip4cir_model.CLIP4Cir.from_pretrained(str(tiny_clip_dir))
    with torch.no_grad():
        model.combiner.output_layer.weight.add_(1.0)
    model.save_combiner(str(tmp_path / "combiner.safetensors"))
    other = clip4cir_model.CLIP4Cir.from_pretrained(str(tiny_clip_dir),
                                                    combiner_path=str(tmp_path / "combiner.safetensors"))
    torch.testing.assert_close(other.combiner.output_layer.weight, model.combiner.output_layer.weight)


# ---------------------------------------------------------------------------------------------- on the world


@pytest.fixture(scope="module")
def world_clip_dir(quick_world, tmp_path_factory):
    """A tiny CLIP over the quick world's vocabulary, random weights, saved and later loaded by path."""
    import json

    scenes = json.loads((quick_world / "synthetic" / "scenes.json").read_text())
    texts = [s["caption"] for s in scenes.values()]
    for name in ("train", "val", "test"):
        texts += [
            r["caption"] for r in json.loads((quick_world / "cirr" / "captions" / f"cap.rc2.{name}.json").read_text())
        ]
    return _tiny_clip.save_tiny_clip(tmp_path_factory.mktemp("wclip") / "clip", _tiny_clip.words_of(texts), seed=0,
                                     image_size=40, patch_size=10, width=32, projection_dim=32)


def test_one_augment_stage2_evaluate_cycle_from_a_checkpoint_path(quick_world, world_clip_dir):
    import wrap as clip4cir_wrap

    import cir_plugins as cp
    from cir_plugins.data.images import ClipTransform
    from cir_plugins.data.synthetic import SyntheticCaptioner

    model = clip4cir_model.CLIP4Cir.from_pretrained(str(world_clip_dir), fusion="sum")
    p = model.preprocess
    transform = ClipTransform("targetpad", p["size"], mean=p["mean"], std=p["std"])
    train = cp.load_cirr(quick_world, "train", transform=transform)
    test = cp.load_cirr(quick_world, "test", transform=transform)
    images = {i: train.images[i] for i in train.gallery_ids}
    wrapped = clip4cir_wrap.wrap(model)
    sample = train.triplets[:3]
    report = cp.check_model(wrapped, torch.stack([images[t.reference] for t in sample]), [t.texts[0] for t in sample],
                            torch.stack([images[t.target] for t in sample]))
    assert report.ok, str(report)
    names = set(report.split.query)
    assert names and all(".text_model." in n or ".text_projection." in n for n in names)
    assert not any("vision_model" in n for n in names)

    config = cp.AugmentConfig(templates="cirr", rank_window=(0.02, 0.2), seed=0, max_triplets=64)
    generated = cp.TripletAugmenter(SyntheticCaptioner(quick_world, noise=0.1, seed=0), model.encode_image,
                                    config=config, show_progress=False).augment(list(images), images).triplets
    assert 0 < len(generated) <= 64 and all(t.source == "generated" for t in generated)
    assert any("instead of" in text for t in generated for text in t.texts)

    vision_before = {n: p.detach().clone() for n, p in model.clip.vision_model.named_parameters()}
    text_before = {n: p.detach().clone() for n, p in model.clip.text_model.named_parameters()}
    bank = cp.NegativeBank.build(wrapped, list(images), images, batch_size=256, show_progress=False)
    config = cp.Stage2Config(epochs=1, batch_size=32, steps_per_epoch=2, lr=1e-3,
                             show_progress=False)
    cp.Stage2Trainer(wrapped, bank, list(train.triplets) + generated, images, config=config).fit()
    # stage 2 trained the text tower and left the vision tower (the bank's maker) bit-identical
    assert all(torch.equal(p, vision_before[n]) for n, p in model.clip.vision_model.named_parameters())
    assert any(not torch.equal(p, text_before[n]) for n, p in model.clip.text_model.named_parameters())
    result = cp.evaluate(wrapped, test, show_progress=False)
    assert {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Rmean"} <= set(result)
    assert result["n_queries"] == len(test.triplets) and result["protocol"]["reference_removed"] is True


@pytest.mark.slow
def test_readme_synthetic_commands_run_as_written(tmp_path, monkeypatch):
    """The README's five synthetic-world commands, in-process, with paths under tmp_path."""
    import importlib
    import json
    import re
    import runpy

    readme = (EXAMPLES / "clip4cir" / "README.md").read_text()
    block = readme.split("The synthetic world with a tiny CLIP")[1].split("```bash")[1].split("```")[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert len(commands) == 5 and all(c.startswith("python ") for c in commands)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = re.split(r"\s+", command)[1:]
        if argv[0] == "-m":
            module, args = argv[1], argv[2:]
            monkeypatch.setattr(sys, "argv", [module] + args)
            assert importlib.import_module(module).main(args) == 0, command
        else:
            script, args = ROOT / argv[0], argv[1:]
            monkeypatch.setattr(sys, "argv", [str(script)] + args)
            namespace = runpy.run_path(str(script), run_name="not_main")
            assert namespace["main"](args) == 0, command
    assert (tmp_path / "runs" / "tiny-clip" / "model.safetensors").is_file()
    for stage in ("stage1", "spn"):
        assert (tmp_path / "runs" / "c4c" / stage / "combiner.safetensors").is_file()
    history = json.loads((tmp_path / "runs" / "c4c" / "spn" / "stage2_history.json").read_text())
    assert len(history) == 2 and all("Rmean" in e["metrics"] for e in history)


def test_conv_tower_tiny_clip_round_trips_by_path(tmp_path):
    """The quickstart's conv-tower tiny CLIP: saved, loaded back by path through AutoModel (no remote code),
    same weights and features; its image features keep each grid cell's position."""
    from transformers import AutoModel, CLIPModel

    vocabulary = _tiny_clip.words_of(["a small red circle at the top left", "make it green"])
    path = _tiny_clip.save_tiny_clip(tmp_path / "conv-clip", vocabulary, seed=0, image_size=24, width=32,
                                     projection_dim=16, vision="conv", conv_channels=(4, 8), grid=3)
    saved = _tiny_clip.TinyConvCLIPModel.from_pretrained(str(path)).eval()
    loaded = AutoModel.from_pretrained(str(path)).eval()
    assert type(loaded) is _tiny_clip.TinyConvCLIPModel and isinstance(loaded, CLIPModel)
    assert loaded.config.conv_channels == [4, 8] and loaded.vision_embed_dim == 8 * 9
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)

    model = clip4cir_model.CLIP4Cir.from_pretrained(str(path), fusion="sum").eval()
    images = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        reference = model.encode_reference(images)
        query = model.compose_query(reference, ["make it green"] * 3)
        # the tower by hand: blocks -> 3x3 max-pool -> flatten -> LayerNorm -> projection
        tower = loaded.vision_model
        by_hand = loaded.visual_projection(tower.norm(F.adaptive_max_pool2d(tower.blocks(images), 3).flatten(1)))
    assert reference.shape == query.shape == (3, 16)
    torch.testing.assert_close(reference, by_hand)
    # moving content from one cell to another changes the features (position survives the pooling)
    shifted = torch.zeros(1, 3, 24, 24)
    shifted[..., :8, :8] = 1.0
    moved = torch.zeros(1, 3, 24, 24)
    moved[..., 16:, 16:] = 1.0
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(shifted), model.encode_image(moved), atol=1e-4)


def test_vit_checkpoints_still_load_as_clipmodel(tiny_clip_dir):
    from transformers import AutoModel, CLIPModel

    assert type(AutoModel.from_pretrained(str(tiny_clip_dir))) is CLIPModel
    assert type(clip4cir_model.CLIP4Cir.from_pretrained(str(tiny_clip_dir)).clip) is CLIPModel


def test_unknown_vision_tower_is_refused():
    with pytest.raises(ValueError, match="unknown vision tower 'resnet'"):
        _tiny_clip.tiny_clip_config(10, vision="resnet")
