"""SPRC's stage-1 checkpoint (LAVIS format) -> this example's transformers layout, one command.

    python -m examples.blip2_sprc.convert_lavis sprc_cirr.pt --base Salesforce/blip2-itm-vit-g --out runs/sprc_stage1
    python -m examples.blip2_sprc.run cycle --model runs/sprc_stage1 --data /path/to/CIRR ...

SPRC saves ``torch.save({"epoch": int, "Blip2QformerCirAlignPrompt": state_dict})``; LAVIS itself saves
``{"model": state_dict, ...}``. The file is read weights-only (``cir_plugins.convert.read_torch_checkpoint``:
nothing in it runs), its LAVIS parameter names are renamed to ``Blip2ForImageTextRetrieval``'s, and the
result is written with ``save_pretrained`` (safetensors) next to the base checkpoint's config, tokenizer
and image processor, so ``SPRCRetriever.from_pretrained(out)`` (and ``wrap.load``) read it.

The renaming (LAVIS -> transformers):

- ``visual_encoder.cls_token`` / ``pos_embed`` / ``patch_embed.proj`` -> ``vision_model.embeddings.class_embedding``
  / ``position_embedding`` / ``patch_embedding``; ``visual_encoder.blocks.N.{norm1, norm2, attn.qkv, attn.proj,
  mlp.fc1, mlp.fc2}`` -> ``vision_model.encoder.layers.N.{layer_norm1, layer_norm2, self_attn.qkv,
  self_attn.projection, mlp.fc1, mlp.fc2}``; EVA's separate ``attn.q_bias`` and ``attn.v_bias`` become one
  ``self_attn.qkv.bias`` = [q_bias, 0, v_bias] (the key has no bias); ``ln_vision`` -> ``vision_model.post_layernorm``.
- ``Qformer.bert.embeddings.{word_embeddings, position_embeddings}`` -> ``embeddings.*``;
  ``Qformer.bert.embeddings.LayerNorm`` -> ``qformer.layernorm``; ``Qformer.bert.encoder.layer.N.*`` ->
  ``qformer.encoder.layer.N.*`` with ``attention.self`` / ``crossattention.self`` -> ``.attention``.
- ``query_tokens``, ``itm_head`` keep their names; ``vision_proj`` / ``text_proj`` -> ``vision_projection`` /
  ``text_projection``.
- Dropped, and listed in ``conversion.json``: ``temp`` (stage 2 starts its own learnable tau 0.05, as the
  release does), ``prompt_tokens`` (SPRC's stage-1 training only), ``Qformer.cls.*`` (the language-model head),
  ``Qformer.bert.embeddings.position_ids`` (a constant buffer).

A checkpoint without ``visual_encoder.*`` (LAVIS can save only trained weights) keeps the base checkpoint's
vision tower; any other missing or unknown name, or a shape that differs from the base, is an error naming it.
Known difference: transformers' ``post_layernorm`` uses the vision config's eps (1e-6) where LAVIS's
``ln_vision`` uses 1e-5.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from cir_plugins._atomic import atomic_write_json
from cir_plugins.convert import read_torch_checkpoint
from cir_plugins.errors import CheckpointError, explain

logger = logging.getLogger("examples.blip2_sprc.convert_lavis")

__all__ = ["lavis_to_transformers", "convert_checkpoint", "DROPPED"]

# LAVIS names with no counterpart in the retrieval model, and why
DROPPED = {
    "temp": "the stage-1 contrastive temperature; stage 2 learns its own tau from 0.05",
    "prompt_tokens": "SPRC's stage-1 training prompt, unused at inference and in stage 2",
    "Qformer.cls.": "the Q-Former's language-model head, unused for retrieval",
    "Qformer.bert.embeddings.position_ids": "a constant buffer (0..L-1)",
}

_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_DIRECT = {
    "query_tokens": "query_tokens",
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "ln_vision.weight": "vision_model.post_layernorm.weight",
    "ln_vision.bias": "vision_model.post_layernorm.bias",
    "Qformer.bert.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "Qformer.bert.embeddings.LayerNorm.weight": "qformer.layernorm.weight",
    "Qformer.bert.embeddings.LayerNorm.bias": "qformer.layernorm.bias",
}
_HEADS = {"vision_proj": "vision_projection", "text_proj": "text_projection", "itm_head": "itm_head"}


def _dropped(name: str) -> bool:
    return any(name == key or (key.endswith(".") and name.startswith(key)) for key in DROPPED)


def _rename(name: str) -> str | None:
    """The transformers name of one LAVIS parameter; None when it has none (see the module doc)."""
    if name in _DIRECT:
        return _DIRECT[name]
    match = re.fullmatch(r"visual_encoder\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
                         r"\.(weight|bias)", name)
    if match:
        block, part, kind = match.groups()
        return f"vision_model.encoder.layers.{block}.{_VISION_BLOCK[part]}.{kind}"
    match = re.fullmatch(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)", name)
    if match:
        layer, rest = match.groups()
        rest = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", rest)
        return f"qformer.encoder.layer.{layer}.{rest}"
    head, _, kind = name.partition(".")
    if head in _HEADS and kind in ("weight", "bias"):
        return f"{_HEADS[head]}.{kind}"
    return None


def lavis_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a LAVIS BLIP-2 state dict to ``Blip2ForImageTextRetrieval``'s names.

    Returns ``(converted, dropped)``: the renamed tensors (EVA's q/v biases merged into one qkv bias) and
    the LAVIS names left out on purpose (:data:`DROPPED`). A name that is neither is a CheckpointError.
    """
    converted: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    for name, tensor in state_dict.items():
        if _dropped(name):
            dropped.append(name)
            continue
        match = re.fullmatch(r"visual_encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)", name)
        if match:
            if match.group(2) == "q_bias":  # [q_bias, 0 (the key has no bias), v_bias] -> (3 Dv,)
                v_bias = state_dict.get(name.replace("q_bias", "v_bias"))
                if v_bias is None:
                    raise CheckpointError(explain(f"{name} has no matching v_bias", got=name,
                                                  fix="convert a complete LAVIS checkpoint"))
                converted[f"vision_model.encoder.layers.{match.group(1)}.self_attn.qkv.bias"] = torch.cat(
                    [tensor, torch.zeros_like(v_bias), v_bias])
            continue
        new = _rename(name)
        if new is None:
            unknown.append(name)
        else:
            converted[new] = tensor
    if unknown:
        raise CheckpointError(explain(f"{len(unknown)} parameter names are not LAVIS BLIP-2 names this converter knows",
                                      got=unknown[:10], fix="check that the file is an SPRC / LAVIS BLIP-2 checkpoint"))
    return converted, dropped


def convert_checkpoint(checkpoint: str | Path, base: str | Path, out: str | Path, *, key: str | None = None) -> Path:
    """Convert ``checkpoint`` onto the architecture of ``base`` (a Hub name or folder of a
    ``Blip2ForImageTextRetrieval`` with tokenizer and image processor) and save it to ``out``."""
    from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForImageTextRetrieval

    state_dict = read_torch_checkpoint(checkpoint, key=key)
    converted, dropped = lavis_to_transformers(state_dict)
    blip = Blip2ForImageTextRetrieval.from_pretrained(str(base))
    expected = blip.state_dict()
    foreign = sorted(set(converted) - set(expected))
    wrong = [f"{n}: {tuple(converted[n].shape)} vs {tuple(expected[n].shape)}" for n in converted
             if n in expected and converted[n].shape != expected[n].shape]
    if foreign or wrong:
        raise CheckpointError(
            explain(
                f"{checkpoint} does not fit the architecture of {base}",
                got=(foreign + wrong)[:10],
                fix="pass --base with the BLIP-2 retrieval checkpoint the model was trained from",
            )
        )
    missing = sorted(set(expected) - set(converted))
    from_base = [n for n in missing if n.startswith("vision_model.")]
    absent = [n for n in missing if n not in from_base]
    if absent:
        raise CheckpointError(explain(f"{checkpoint} lacks Q-Former / projection weights", got=absent[:10],
                                      fix="convert the full stage-1 checkpoint"))
    if from_base:
        logger.warning("%d vision-tower weights are not in %s; keeping those of %s", len(from_base), checkpoint, base)
    with torch.no_grad():
        for name, tensor in converted.items():
            expected[name].copy_(tensor.to(expected[name].dtype))  # the state dict's tensors are the parameters
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blip.save_pretrained(str(out))  # config.json + model.safetensors
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    try:
        AutoImageProcessor.from_pretrained(str(base)).save_pretrained(str(out))
    except OSError:
        logger.warning("%s has no image processor; SPRCRetriever needs one for its image size and normalisation", base)
    atomic_write_json(out / "conversion.json", {
        "source": str(checkpoint), "key": key, "base": str(base), "converted": len(converted),
        "dropped": {name: next(why for k, why in DROPPED.items() if name == k or name.startswith(k))
                    for name in dropped},
        "vision_from_base": len(from_base)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.blip2_sprc.convert_lavis", description=__doc__.splitlines()[0]
    )
    parser.add_argument("checkpoint", help="the SPRC / LAVIS .pt/.pth file")
    parser.add_argument("--base", required=True,
                        help="Blip2ForImageTextRetrieval Hub name or folder (architecture, tokenizer, image processor)")
    parser.add_argument("--out", required=True, help="folder to write the converted model to")
    parser.add_argument("--key", default=None, help="the entry holding the state dict (default: found)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = convert_checkpoint(args.checkpoint, args.base, args.out, key=args.key)
    print(f"converted {args.checkpoint} -> {out} (load it with examples.blip2_sprc.wrap.load({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
