"""CLIP4Cir's published stage-1 checkpoints -> the CLIP4Cir example on the open_clip backbone
(examples/clip4cir/convert.py).

Tiny checkpoints are synthesised in CLIP4Cir's exact layout: ``{"epoch", "CLIP": OpenAI-format state dict}``
(a tiny ModifiedResNet CLIP built from an open_clip config, offline) and ``{"epoch", "Combiner": state
dict}`` with CLIP4Cir's Combiner names (text_projection_layer, image_projection_layer, combiner_layer,
output_layer, dynamic_scalar.0 / .3). After conversion the example's image features, text features and
composed queries equal open_clip's own CLIP built from the same tensors, and a Combiner forward written
here from the CLIP4Cir-named tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip", reason="the open_clip extra (pip install .[open_clip])")

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cir_plugins as cp  # noqa: E402
from cir_plugins.errors import CheckpointError  # noqa: E402
from examples.clip4cir.convert import convert_checkpoints, main  # noqa: E402
from examples.clip4cir.model import CLIP4Cir, OpenCLIPBackbone  # noqa: E402
from examples.clip4cir.wrap import wrap  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, P, HID, SIZE = 16, 24, 40, 64  # embedding dim, Combiner projection / hidden dims, image side


def tiny_openai_clip() -> dict:
    """A tiny OpenAI-layout CLIP (ModifiedResNet image tower, 1-layer text transformer), fp32 weights."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(3)
    model = open_clip.CLIP(embed_dim=D, vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=SIZE),
                           text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
                           quick_gelu=True)
    state = model.state_dict()
    for name, tensor in state.items():  # non-trivial batch-norm statistics and fp32 values that fp16 cannot hold
        if name.endswith("running_mean"):
            tensor.normal_(0, 0.1)
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 1.5)
        elif tensor.is_floating_point():
            tensor.add_(torch.randn_like(tensor) * 1e-4)
    return state


def clip4cir_combiner() -> dict:
    """CLIP4Cir's Combiner state dict: its own module names, (projection P, hidden HID)."""
    g = torch.Generator().manual_seed(5)

    def linear(name, out, inp):
        return {f"{name}.weight": torch.randn(out, inp, generator=g) / inp ** 0.5,
                f"{name}.bias": torch.randn(out, generator=g) * 0.1}

    return (linear("text_projection_layer", P, D) | linear("image_projection_layer", P, D)
            | linear("combiner_layer", HID, 2 * P) | linear("output_layer", D, HID)
            | linear("dynamic_scalar.0", HID, 2 * P) | linear("dynamic_scalar.3", 1, HID))


def reference_combiner(sd, image, text):
    """CLIP4Cir's combine_features from its own tensors (eval mode: no dropout)."""
    lin = lambda name, x: F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])  # noqa: E731
    joint = torch.cat([F.relu(lin("text_projection_layer", text)), F.relu(lin("image_projection_layer", image))], -1)
    gate = torch.sigmoid(lin("dynamic_scalar.3", F.relu(lin("dynamic_scalar.0", joint))))
    return F.normalize(lin("output_layer", F.relu(lin("combiner_layer", joint))) + gate * text + (1 - gate) * image,
                       dim=-1)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip4cir_release")
    clip_state, combiner_state = tiny_openai_clip(), clip4cir_combiner()
    torch.save({"epoch": 7, "CLIP": clip_state}, root / "cirr_clip_RN50x4_fullft.pt")
    torch.save({"epoch": 7, "Combiner": combiner_state}, root / "cirr_comb_RN50x4_fullft.pt")
    return root, clip_state, combiner_state


def _reference_clip(clip_state):
    from open_clip.model import build_model_from_openai_state_dict

    model = build_model_from_openai_state_dict(dict(clip_state), quick_gelu=True).float()
    model.load_state_dict(clip_state)
    return model.eval()


def test_converted_checkpoints_equal_open_clip_and_a_hand_written_combiner(released, tmp_path):
    root, clip_state, combiner_state = released
    out = convert_checkpoints(root / "cirr_clip_RN50x4_fullft.pt", tmp_path / "converted",
                              combiner=root / "cirr_comb_RN50x4_fullft.pt")
    assert json.loads((out / "clip4cir.json").read_text())["fusion"] == "combiner"
    model = CLIP4Cir.from_pretrained(str(out)).eval()  # the example's usual loader finds the open_clip folder
    assert isinstance(model.clip, OpenCLIPBackbone) and model.fusion == "combiner"
    assert model.preprocess == {"size": SIZE, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                                "std": list(open_clip.OPENAI_DATASET_STD)}
    # float32 weights kept exactly (not rounded through fp16 on the way)
    assert torch.equal(model.clip.model.visual.conv1.weight, clip_state["visual.conv1.weight"])

    reference = _reference_clip(clip_state)
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, SIZE, SIZE)
    texts = ["is red and shorter", "has long sleeves and no collar", "a"]
    with torch.no_grad():
        ref_image = reference.encode_image(pixels)
        ref_text = reference.encode_text(open_clip.get_tokenizer("RN50x4")(texts))
        torch.testing.assert_close(model.encode_image(pixels), F.normalize(ref_image, dim=-1))
        torch.testing.assert_close(model.text_features(texts), ref_text)
        query = model.compose_query(model.encode_reference(pixels), texts)
        torch.testing.assert_close(query, reference_combiner(combiner_state, ref_image, ref_text), rtol=1e-5, atol=1e-6)
        model.fusion = "sum"  # the SPN release's CLIP4Cir fusion
        query = model.compose_query(model.encode_reference(pixels), texts)
        torch.testing.assert_close(query, F.normalize(ref_image + ref_text, dim=-1))


def test_stage2_trains_the_text_tower_of_the_open_clip_backbone(released, tmp_path):
    root, _, _ = released
    out = convert_checkpoints(root / "cirr_clip_RN50x4_fullft.pt", tmp_path / "sum")
    model = CLIP4Cir.from_pretrained(str(out))
    assert model.fusion == "sum" and not (out / "combiner.safetensors").exists()
    wrapped = wrap(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    split = cp.protocol.parameter_split(wrapped, x, ["red", "blue"], x)
    query_roots = {n.split(".")[3] for n in split.query}
    assert query_roots == {"transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection"}
    visual = [n for n, _ in wrapped.named_parameters() if n.startswith("model.clip.model.visual.")]
    assert visual and set(visual) <= set(split.target)  # the image tower stays frozen


def test_bad_files_get_clear_errors_and_the_command_line_works(released, tmp_path, capsys):
    root, clip_state, combiner_state = released
    torch.save({"epoch": 1, "Combiner": combiner_state | {"extra_head.weight": torch.zeros(2)}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="extra_head.weight"):
        convert_checkpoints(root / "cirr_clip_RN50x4_fullft.pt", tmp_path / "x", combiner=tmp_path / "odd.pt")
    broken = {k: v for k, v in clip_state.items() if k != "ln_final.weight"}
    torch.save({"epoch": 1, "CLIP": broken}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="not an OpenAI-format"):
        convert_checkpoints(tmp_path / "broken.pt", tmp_path / "y")
    assert main(["--clip", str(root / "cirr_clip_RN50x4_fullft.pt"), "--combiner",
                 str(root / "cirr_comb_RN50x4_fullft.pt"), "--out", str(tmp_path / "cli")]) == 0
    assert "converted" in capsys.readouterr().out
    assert CLIP4Cir.from_pretrained(str(tmp_path / "cli")).combiner.gate[0].weight.shape == (HID, 2 * P)


def test_stage_checkpoints_of_the_open_clip_backbone_round_trip(released, tmp_path):
    """The example's own save_checkpoint / load_checkpoint (what run_spn.py and evaluate.py use) keep the
    open_clip backbone, its weights and the Combiner."""
    from examples.clip4cir import _common as C

    root, _, _ = released
    converted = convert_checkpoints(root / "cirr_clip_RN50x4_fullft.pt", tmp_path / "converted",
                                    combiner=root / "cirr_comb_RN50x4_fullft.pt")
    model = C.load_checkpoint(str(converted)).eval()
    assert model.fusion == "combiner"
    with torch.no_grad():
        model.clip.model.ln_final.weight.add_(0.01)  # as if stage 2 had trained the text tower
    saved = C.save_checkpoint(model, tmp_path / "after_stage2")
    again = C.load_checkpoint(str(saved)).eval()
    # (_common imports model.py as the scripts do, as module "model": compare the class by name)
    assert type(again.clip).__name__ == "OpenCLIPBackbone" and again.fusion == "combiner"
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again.compose_query(again.encode_reference(pixels), ["red", "blue"]),
                                   model.compose_query(model.encode_reference(pixels), ["red", "blue"]), rtol=0, atol=0)
