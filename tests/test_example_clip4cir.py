"""The CLIP4Cir example: model file, wrapping, and one augment -> stage-2 -> evaluate cycle on the
synthetic world with a tiny CLIP saved to disk and loaded back by path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
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
    """METHOD.md section 4 written out step by step (eval mode: dropout is identity)."""
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
