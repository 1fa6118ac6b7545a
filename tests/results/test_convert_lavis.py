"""SPRC's LAVIS-format stage-1 checkpoint -> the SPRC example (examples/blip2_sprc/convert_lavis.py).

A tiny checkpoint is synthesised with exactly LAVIS's parameter names (EVA ViT ``visual_encoder.blocks.N``
with separate q/v biases, ``ln_vision``, ``Qformer.bert.*`` BERT names, ``query_tokens``, ``vision_proj``,
``text_proj``, ``itm_head``, ``temp``, ``prompt_tokens``, the LM head) in SPRC's saved layout
``{"epoch", "Blip2QformerCirAlignPrompt": state_dict}``. After conversion the example's gallery tokens and
queries equal a forward pass written here from the LAVIS tensors themselves (EVA blocks, ``ln_vision``
with LAVIS's eps, BERT layers with the query / text feed-forward split, SPRC's two passes).
"""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cir_plugins.errors import CheckpointError  # noqa: E402
from examples.blip2_sprc import run as blip2_run  # noqa: E402
from examples.blip2_sprc.convert_lavis import convert_checkpoint, lavis_to_transformers, main  # noqa: E402
from examples.blip2_sprc.model import SPRCRetriever, make_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DV, HV, IV, LV, PATCH, SIZE = 32, 2, 64, 1, 8, 32  # vision width, heads, FFN, layers, patch, image side
H, HQ, IQ, LQ = 32, 2, 64, 2  # Q-Former width, heads, FFN, layers (cross-attention in every layer)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("blip2_base"), blip2_run.WORLD_WORDS)


def lavis_state_dict(vocab: int, positions: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors under LAVIS BLIP-2 / SPRC names, sized for the tiny base configuration."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, width):
        return {f"{prefix}.weight": 1 + 0.1 * rnd(width, scale=1.0), f"{prefix}.bias": 0.1 * rnd(width, scale=1.0)}

    def linear(prefix, out, inp):
        return {f"{prefix}.weight": rnd(out, inp), f"{prefix}.bias": 0.1 * rnd(out, scale=1.0)}

    n_patches = (SIZE // PATCH) ** 2
    sd = {
        "visual_encoder.cls_token": rnd(1, 1, DV, scale=1.0),
        "visual_encoder.pos_embed": rnd(1, n_patches + 1, DV, scale=0.5),
        **linear("visual_encoder.patch_embed.proj", DV, 3 * PATCH * PATCH),
    }
    sd["visual_encoder.patch_embed.proj.weight"] = sd["visual_encoder.patch_embed.proj.weight"].reshape(
        DV, 3, PATCH, PATCH
    )
    for i in range(LV):
        b = f"visual_encoder.blocks.{i}"
        sd |= norm(f"{b}.norm1", DV) | norm(f"{b}.norm2", DV)
        sd[f"{b}.attn.qkv.weight"] = rnd(3 * DV, DV)
        sd[f"{b}.attn.q_bias"], sd[f"{b}.attn.v_bias"] = 0.1 * rnd(DV, scale=1.0), 0.1 * rnd(DV, scale=1.0)
        sd |= linear(f"{b}.attn.proj", DV, DV) | linear(f"{b}.mlp.fc1", IV, DV) | linear(f"{b}.mlp.fc2", DV, IV)
    sd |= norm("ln_vision", DV)
    sd["query_tokens"] = rnd(1, 32, H, scale=1.0)
    e = "Qformer.bert.embeddings"
    sd[f"{e}.word_embeddings.weight"] = rnd(vocab, H, scale=1.0)
    sd[f"{e}.position_embeddings.weight"] = rnd(positions, H, scale=0.5)
    sd[f"{e}.position_ids"] = torch.arange(positions)[None]
    sd |= norm(f"{e}.LayerNorm", H)
    for i in range(LQ):
        layer = f"Qformer.bert.encoder.layer.{i}"
        for attn, kv_width in (("attention", H), ("crossattention", DV)):
            sd |= linear(f"{layer}.{attn}.self.query", H, H) | linear(f"{layer}.{attn}.self.key", H, kv_width)
            sd |= linear(f"{layer}.{attn}.self.value", H, kv_width) | linear(f"{layer}.{attn}.output.dense", H, H)
            sd |= norm(f"{layer}.{attn}.output.LayerNorm", H)
        for ffn in ("", "_query"):
            sd |= linear(f"{layer}.intermediate{ffn}.dense", IQ, H) | linear(f"{layer}.output{ffn}.dense", H, IQ)
            sd |= norm(f"{layer}.output{ffn}.LayerNorm", H)
    sd |= linear("Qformer.cls.predictions.transform.dense", H, H) | norm(
        "Qformer.cls.predictions.transform.LayerNorm", H
    )
    sd["Qformer.cls.predictions.bias"] = torch.zeros(vocab)
    sd |= linear("vision_proj", 256, H) | linear("text_proj", 256, H) | linear("itm_head", 2, H)
    sd["temp"] = torch.tensor(0.07)
    sd["prompt_tokens"] = rnd(1, 32, H, scale=1.0)
    return sd


# ------------------------------------------------------------------------------------------------
# a forward pass written from the LAVIS tensors (EVA ViT + ln_vision, BERT Q-Former, SPRC's passes)


def _lin(sd, prefix, x):
    return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _ln(sd, prefix, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _heads(x, n):  # (B, L, D) -> (B, n, L, D / n)
    return x.reshape(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def _attend(q, k, v, n, additive_mask=None):
    q, k, v = _heads(q, n), _heads(k, n), _heads(v, n)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, n, Lq, Lk)
    if additive_mask is not None:
        scores = scores + additive_mask
    out = scores.softmax(-1) @ v  # (B, n, Lq, d)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def lavis_image_embeds(sd, pixels):
    """EVA ViT (LAVIS eva_vit: blocks without a final norm) then ln_vision (nn.LayerNorm, eps 1e-5)."""
    x = F.conv2d(pixels, sd["visual_encoder.patch_embed.proj.weight"], sd["visual_encoder.patch_embed.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)  # (B, P, DV)
    x = torch.cat([sd["visual_encoder.cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["visual_encoder.pos_embed"]
    for i in range(LV):
        b = f"visual_encoder.blocks.{i}"
        h = _ln(sd, f"{b}.norm1", x, 1e-6)
        bias = torch.cat([sd[f"{b}.attn.q_bias"], torch.zeros(DV), sd[f"{b}.attn.v_bias"]])
        q, k, v = F.linear(h, sd[f"{b}.attn.qkv.weight"], bias).chunk(3, dim=-1)
        x = x + _lin(sd, f"{b}.attn.proj", _attend(q, k, v, HV))
        x = x + _lin(sd, f"{b}.mlp.fc2", F.gelu(_lin(sd, f"{b}.mlp.fc1", _ln(sd, f"{b}.norm2", x, 1e-6))))
    return _ln(sd, "ln_vision", x, 1e-5)


def lavis_qformer(sd, query_embeds, input_ids=None, text_mask=None, image=None, query_length=None):
    """LAVIS BertModel.forward: [queries | word + position embeddings] -> LayerNorm -> layers, the first
    ``query_length`` tokens cross-attend to ``image`` and take the query FFN, the rest the text FFN."""
    e = "Qformer.bert.embeddings"
    x = query_embeds
    if input_ids is not None:
        text = sd[f"{e}.word_embeddings.weight"][input_ids] + sd[f"{e}.position_embeddings.weight"][:input_ids.shape[1]]
        x = torch.cat([query_embeds, text], 1)
    x = _ln(sd, f"{e}.LayerNorm", x, 1e-12)
    q_len = query_embeds.shape[1] if query_length is None else query_length
    mask = torch.ones(x.shape[:2])
    if text_mask is not None:
        mask[:, query_embeds.shape[1]:] = text_mask
    additive = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
    for i in range(LQ):
        layer = f"Qformer.bert.encoder.layer.{i}"
        a = f"{layer}.attention"
        att = _attend(_lin(sd, f"{a}.self.query", x), _lin(sd, f"{a}.self.key", x), _lin(sd, f"{a}.self.value", x),
                      HQ, additive)
        x = _ln(sd, f"{a}.output.LayerNorm", _lin(sd, f"{a}.output.dense", att) + x, 1e-12)
        queries, texts = x[:, :q_len], x[:, q_len:]
        if q_len and image is not None:
            c = f"{layer}.crossattention"
            att = _attend(_lin(sd, f"{c}.self.query", queries), _lin(sd, f"{c}.self.key", image),
                          _lin(sd, f"{c}.self.value", image), HQ)
            queries = _ln(sd, f"{c}.output.LayerNorm", _lin(sd, f"{c}.output.dense", att) + queries, 1e-12)
        parts = []
        for part, ffn in ((queries, "_query"), (texts, "")):
            if part.shape[1]:
                hidden = F.gelu(_lin(sd, f"{layer}.intermediate{ffn}.dense", part))
                parts.append(_ln(sd, f"{layer}.output{ffn}.LayerNorm", _lin(sd, f"{layer}.output{ffn}.dense", hidden)
                                 + part, 1e-12))
        x = torch.cat(parts, 1)
    return x


def lavis_sprc(sd, pixels, input_ids, text_mask):
    """(gallery tokens (B, 32, 256), SPRC query (B, 256)) from the LAVIS tensors."""
    image = lavis_image_embeds(sd, pixels)
    queries = sd["query_tokens"].expand(pixels.shape[0], -1, -1)
    target = lavis_qformer(sd, queries, image=image)  # (B, 32, H)
    tokens = F.normalize(_lin(sd, "vision_proj", target), dim=-1)
    fused = lavis_qformer(sd, queries, input_ids, text_mask, image=image)[:, :32]  # the fusion pass's prompt
    hidden = lavis_qformer(sd, fused, input_ids, text_mask, query_length=0)  # image-free, text FFN only
    return tokens, F.normalize(_lin(sd, "text_proj", hidden[:, 32]), dim=-1)


# ------------------------------------------------------------------------------------------------


def _saved(tmp_path, sd, name="sprc_stage1.pt"):
    path = tmp_path / name
    torch.save({"epoch": 4, "Blip2QformerCirAlignPrompt": sd}, path)
    return path


def _sizes(base):
    model = SPRCRetriever.from_pretrained(base)
    return model.blip.config.qformer_config.vocab_size, model.blip.config.qformer_config.max_position_embeddings


def test_converted_model_equals_a_forward_pass_written_from_the_lavis_tensors(base, tmp_path):
    sd = lavis_state_dict(*_sizes(base))
    out = convert_checkpoint(_saved(tmp_path, sd), base, tmp_path / "converted")
    assert (out / "model.safetensors").is_file() and (out / "conversion.json").is_file()
    model = SPRCRetriever.from_pretrained(out).eval()
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, SIZE, SIZE)
    texts = ["make it red", "a small blue star at the top and a large green circle", "remove"]
    input_ids, text_mask = model._tokenize(texts, torch.device("cpu"))
    with torch.no_grad():
        tokens, query = model.image_tokens(pixels), model(pixels, texts)
        ref_tokens, ref_query = lavis_sprc(sd, pixels, input_ids, text_mask.float())
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(query, ref_query, rtol=1e-4, atol=1e-4)
    # the stage-2 copy starts as the converted Q-Former
    for a, b in zip(model.blip.qformer.parameters(), model.query_qformer.parameters()):
        assert torch.equal(a, b)


def test_dropped_names_are_reported_and_a_checkpoint_without_the_vision_tower_keeps_the_bases(base, tmp_path):
    sd = lavis_state_dict(*_sizes(base))
    converted, dropped = lavis_to_transformers(sd)
    assert set(dropped) >= {"temp", "prompt_tokens", "Qformer.bert.embeddings.position_ids",
                            "Qformer.cls.predictions.bias"}
    q = sd["visual_encoder.blocks.0.attn.q_bias"]
    torch.testing.assert_close(converted["vision_model.encoder.layers.0.self_attn.qkv.bias"],
                               torch.cat([q, torch.zeros(DV), sd["visual_encoder.blocks.0.attn.v_bias"]]))
    no_vision = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}
    out = convert_checkpoint(_saved(tmp_path, no_vision), base, tmp_path / "no_vision")
    model, original = SPRCRetriever.from_pretrained(out), SPRCRetriever.from_pretrained(base)
    for (name, a), (_, b) in zip(model.blip.vision_model.encoder.named_parameters(),
                                 original.blip.vision_model.encoder.named_parameters()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(model.blip.vision_model.post_layernorm.weight, sd["ln_vision.weight"])


def test_bad_checkpoints_get_clear_errors(base, tmp_path):
    sd = lavis_state_dict(*_sizes(base))
    with pytest.raises(CheckpointError, match="fusion_head.weight"):  # not a LAVIS BLIP-2 name
        lavis_to_transformers(sd | {"fusion_head.weight": torch.zeros(1)})
    odd = sd | {"Qformer.bert.encoder.layer.0.unknown.weight": torch.zeros(1)}  # renamed, but not in the base
    with pytest.raises(CheckpointError, match="qformer.encoder.layer.0.unknown.weight"):
        convert_checkpoint(_saved(tmp_path, odd, "odd.pt"), base, tmp_path / "odd")
    wide = dict(sd)
    wide["text_proj.weight"] = torch.zeros(256, H + 1)
    with pytest.raises(CheckpointError, match="text_projection.weight"):
        convert_checkpoint(_saved(tmp_path, wide, "wide.pt"), base, tmp_path / "wide")
    partial = {k: v for k, v in sd.items() if not k.startswith("Qformer.bert.encoder.layer.1.")}
    with pytest.raises(CheckpointError, match="lacks Q-Former"):
        convert_checkpoint(_saved(tmp_path, partial, "partial.pt"), base, tmp_path / "partial")


class _Payload:  # a pickle that would run code when loaded
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_with_code_is_refused_and_the_command_line_works(base, tmp_path, capsys):
    bad = tmp_path / "code.pt"
    with open(bad, "wb") as handle:
        pickle.dump({"Blip2QformerCirAlignPrompt": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="weights only"):
        convert_checkpoint(bad, base, tmp_path / "never")
    assert "this must never run" not in capsys.readouterr().out
    sd = lavis_state_dict(*_sizes(base))
    assert main([str(_saved(tmp_path, sd)), "--base", str(base), "--out", str(tmp_path / "cli")]) == 0
    assert SPRCRetriever.from_pretrained(tmp_path / "cli").max_text_length == 32
