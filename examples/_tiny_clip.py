"""A tiny CLIP that stands in for a pretrained vision-language model in the examples and tests.

Everything here produces a real Hugging Face checkpoint directory (``config.json`` + safetensors
weights, a tokenizer and an image processor), so the code that consumes it is the same code that
loads ``openai/clip-vit-base-patch32``: ``CLIPModel.from_pretrained(path)``,
``AutoTokenizer.from_pretrained(path)``, ``AutoImageProcessor.from_pretrained(path)``.

- :func:`build_tokenizer`: a word-level tokenizer (``tokenizers`` library) over a vocabulary,
  ``<bos> words <eos>``, saved as a ``PreTrainedTokenizerFast``.
- :func:`tiny_clip_config`: a small ``CLIPConfig`` (ViT tower on small images, 2-layer text tower), or with
  ``vision="conv"`` a :class:`TinyConvCLIPConfig`: the same text tower and a 3-block CNN image tower.
- :class:`TinyConvCLIPModel`: ``CLIPModel`` with the ViT replaced by a small CNN (``model_type``
  ``"tiny-conv-clip"``, registered with ``AutoConfig`` / ``AutoModel`` when this module is imported, so
  ``AutoModel.from_pretrained(path)`` loads it like any transformers checkpoint, with no remote code).
- :func:`save_tiny_clip`: build a randomly initialised tiny CLIP and save it (tests use this).
- :func:`pretrain_tiny_clip`: contrastive image-caption pretraining (CLIP's symmetric InfoNCE), then save.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["SPECIAL_TOKENS", "words_of", "build_tokenizer", "tiny_clip_config", "save_tiny_clip",
           "pretrain_tiny_clip", "pretrain_on_world", "is_saved_clip", "TinyConvCLIPConfig", "TinyConvCLIPModel",
           "register"]

# id 0..3; eos must not be id 2 (transformers' CLIP treats eos_token_id == 2 as a legacy argmax pooling)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
_WORD = re.compile(r"\w+|[^\w\s]+")
# words of the modification-text templates (docs/method.md section 2), so generated texts have no <unk>
TEMPLATE_WORDS = ("instead", "of", "unlike", "i", "want", ",", "and")


def words_of(texts: Iterable[str]) -> list[str]:
    """Sorted set of lower-cased words and punctuation runs in ``texts`` (the tokenizer's splitting)."""
    vocabulary = set(TEMPLATE_WORDS)
    for text in texts:
        vocabulary.update(_WORD.findall(text.lower()))
    return sorted(vocabulary)


def build_tokenizer(vocabulary: Sequence[str], *, max_length: int = 32):
    """Word-level fast tokenizer over ``vocabulary``: ``<bos> w1 ... wn <eos>``, lower-cased.

    Returns a ``transformers.PreTrainedTokenizerFast`` (ids: specials 0..3, then the words in order).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+, the same split as words_of
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)


def tiny_clip_config(vocab_size: int, *, image_size: int = 36, patch_size: int = 12, width: int = 64,
                     layers: int = 2, heads: int = 4, projection_dim: int = 64, max_length: int = 32,
                     vision: str = "vit", conv_channels: Sequence[int] = (16, 32, 64), grid: int = 3):
    """A small CLIP config: a ``layers``-block text transformer of ``width`` and an image tower.

    ``vision="vit"``: a ``CLIPConfig`` whose ViT cuts (image_size / patch_size)^2 patches, ``layers`` blocks
    of ``width``. ``vision="conv"``: a :class:`TinyConvCLIPConfig`, 3x3 convolution blocks of
    ``conv_channels`` (2x max-pooled between blocks), max-pooled to a ``grid`` x ``grid`` map and flattened.
    """
    from transformers import CLIPConfig

    if vision not in ("vit", "conv"):
        raise ValueError(f"unknown vision tower {vision!r}; expected 'vit' or 'conv'.")
    text = dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=max_length, pad_token_id=0, bos_token_id=2,
                eos_token_id=3, projection_dim=projection_dim)
    if vision == "conv":
        conv_channels = [int(c) for c in conv_channels]
        flat = conv_channels[-1] * grid * grid
        # the vision_config only records the tower's output width (and the image size) for CLIPConfig's sake
        record = dict(image_size=image_size, hidden_size=flat, intermediate_size=flat, num_hidden_layers=1,
                      num_attention_heads=1, num_channels=3, projection_dim=projection_dim)
        return TinyConvCLIPConfig(text_config=text, vision_config=record, projection_dim=projection_dim,
                                  conv_channels=conv_channels, grid=grid)
    vision_cfg = dict(image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=2 * width,
                      num_hidden_layers=layers, num_attention_heads=heads, num_channels=3,
                      projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision_cfg, projection_dim=projection_dim)


def _conv_clip_classes():
    """Define the conv-tower CLIP classes (in a function, so their transformers imports stay local)."""
    from torch import nn
    from transformers import CLIPConfig, CLIPModel
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPPreTrainedModel, CLIPTextModel

    class TinyConvCLIPConfig(CLIPConfig):
        """``CLIPConfig`` plus the CNN image tower's shape (``conv_channels``, ``grid``)."""

        model_type = "tiny-conv-clip"

        def __init__(self, conv_channels=(16, 32, 64), grid: int = 3, **kwargs):
            self.conv_channels = [int(c) for c in conv_channels]
            self.grid = int(grid)
            super().__init__(**kwargs)

    class ConvTower(nn.Module):
        """pixel_values (B, 3, S, S) -> pooler_output (B, C * grid^2): conv blocks, grid max-pool, LayerNorm.

        Each block is Conv3x3 -> GroupNorm(1 group) -> GELU, with a 2x max-pool between blocks; the last map
        is max-pooled to grid x grid cells (one per scene cell: an object is found wherever it is jittered
        inside its cell) and flattened, so the position of every cell survives into the features.
        """

        def __init__(self, channels: Sequence[int], grid: int) -> None:
            super().__init__()
            blocks, previous = [], 3
            for index, width in enumerate(channels):
                if index:
                    blocks.append(nn.MaxPool2d(2))
                blocks += [nn.Conv2d(previous, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU()]
                previous = width
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveMaxPool2d(grid)
            self.norm = nn.LayerNorm(previous * grid * grid)

        def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, return_dict=True,
                    **kwargs) -> BaseModelOutputWithPooling:
            maps = self.blocks(pixel_values)  # (B, C, h, w)
            pooled = self.norm(self.pool(maps).flatten(1))  # (B, C * grid^2)
            return BaseModelOutputWithPooling(last_hidden_state=maps.flatten(2).transpose(1, 2),
                                              pooler_output=pooled)

    class TinyConvCLIPModel(CLIPModel):
        """``CLIPModel`` whose image tower is :class:`ConvTower`; text tower, projections, logit scale and
        every method (``get_image_features``, ``get_text_features``, ``forward``) are CLIP's own."""

        config_class = TinyConvCLIPConfig

        def __init__(self, config: TinyConvCLIPConfig) -> None:
            CLIPPreTrainedModel.__init__(self, config)
            self.projection_dim = config.projection_dim
            self.text_embed_dim = config.text_config.hidden_size
            self.vision_embed_dim = config.conv_channels[-1] * config.grid ** 2
            self.text_model = CLIPTextModel._from_config(config.text_config)
            self.vision_model = ConvTower(config.conv_channels, config.grid)
            self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
            self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(self.config.logit_scale_init_value))
            self.post_init()

    return TinyConvCLIPConfig, TinyConvCLIPModel


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` know ``model_type="tiny-conv-clip"`` (idempotent)."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(TinyConvCLIPConfig.model_type, TinyConvCLIPConfig, exist_ok=True)
    AutoModel.register(TinyConvCLIPConfig, TinyConvCLIPModel, exist_ok=True)


TinyConvCLIPConfig, TinyConvCLIPModel = _conv_clip_classes()
register()


def _image_processor(image_size: int, mean: Sequence[float], std: Sequence[float]):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(mean), image_std=list(std))


def save_tiny_clip(out_dir: str | os.PathLike, vocabulary: Sequence[str], *, seed: int = 0, image_size: int = 36,
                   mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25),
                   model=None, tokenizer=None, **config_kwargs):
    """Save a tiny CLIP checkpoint directory (random weights unless ``model`` is given); returns the path.

    Written into a temporary sibling directory and renamed into place, so a crash never leaves a half
    checkpoint under ``out_dir``.
    """
    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = build_tokenizer(vocabulary, max_length=config_kwargs.get("max_length", 32))
    if model is None:
        torch.manual_seed(seed)
        model = _build(tiny_clip_config(len(tokenizer), image_size=image_size, **config_kwargs))
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _image_processor(image_size, mean, std).save_pretrained(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _build(config):
    """A randomly initialised model for ``config`` (CLIPModel, or TinyConvCLIPModel for the conv tower)."""
    from transformers import CLIPModel

    return TinyConvCLIPModel(config) if isinstance(config, TinyConvCLIPConfig) else CLIPModel(config)


def is_saved_clip(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete checkpoint written by :func:`save_tiny_clip`."""
    path = Path(path)
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json",
                                                    "preprocessor_config.json"))


def pretrain_tiny_clip(out_dir: str | os.PathLike, images: torch.Tensor, captions: Sequence[str], *,
                       epochs: int = 4, batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 0.05,
                       seed: int = 0, device: str = "cpu", image_size: int | None = None,
                       mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25),
                       vocabulary: Sequence[str] | None = None, show_progress: bool = True, **config_kwargs) -> dict:
    """Pretrain a tiny CLIP on image-caption pairs with the symmetric InfoNCE loss and save it.

    Args:
        images: (N, 3, S, S) preprocessed images (already normalised with ``mean`` / ``std``).
        captions: N captions, one per image.
        epochs, batch_size, lr, weight_decay: AdamW with linear warm-up (5% of steps) then cosine decay.
        vocabulary: tokenizer words; default ``words_of(captions)``.
    Returns {"steps", "final_loss", "seconds", "path"}; the checkpoint goes to ``out_dir``.
    """
    if images.dim() != 4 or images.shape[0] != len(captions):
        raise ValueError(f"images must be (N, 3, S, S) with one caption each; got {tuple(images.shape)} "
                         f"and {len(captions)} captions.")
    image_size = image_size or int(images.shape[-1])
    tokenizer = build_tokenizer(vocabulary or words_of(captions), max_length=config_kwargs.get("max_length", 32))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _build(tiny_clip_config(len(tokenizer), image_size=image_size, **config_kwargs)).to(device)
    encoded = tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]  # (N, L)
    n = images.shape[0]
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    model.train()
    start, loss_value = time.perf_counter(), float("nan")
    bar = tqdm(total=total, desc="pretrain tiny CLIP", disable=not show_progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for step in range(steps_per_epoch):
            rows = order[step * batch_size:(step + 1) * batch_size]
            pixel = images[rows].to(device)
            image = F.normalize(model.get_image_features(pixel_values=pixel).pooler_output, dim=-1)  # (b, D)
            text = F.normalize(model.get_text_features(input_ids=ids[rows].to(device),
                                                       attention_mask=mask[rows].to(device)).pooler_output, dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * image @ text.T  # (b, b): image i vs caption j
            labels = torch.arange(len(rows), device=device)
            loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_value = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    model.eval().cpu()
    save_tiny_clip(out_dir, [], image_size=image_size, mean=mean, std=std, model=model, tokenizer=tokenizer)
    info = {"steps": total, "final_loss": loss_value, "seconds": time.perf_counter() - start, "path": str(out_dir)}
    tmp = Path(out_dir) / f"pretrain.json.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(info, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, Path(out_dir) / "pretrain.json")
    logger.info("pretrained tiny CLIP: %d steps, final loss %.3f, %.1fs", total, loss_value, info["seconds"])
    return info


def pretrain_on_world(world: str | os.PathLike, out_dir: str | os.PathLike, *, epochs: int = 4,
                      batch_size: int = 256, lr: float = 2e-3, seed: int = 0, device: str = "cpu",
                      mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25),
                      show_progress: bool = True, **config_kwargs) -> dict:
    """Pretrain on a synthetic world's train images and their exact scene captions (``scenes.json``)."""
    import cir_plugins as cp
    from cir_plugins.data.images import ClipTransform
    from cir_plugins.data.synthetic import load_scenes

    scenes = load_scenes(world)
    params = json.loads((Path(world) / "synthetic" / "world.json").read_text())["params"]
    size = int(params["image_size"])
    if config_kwargs.get("patch_size") is None:
        config_kwargs["patch_size"] = size // 3 if size % 3 == 0 else size // 4
    train = cp.load_cirr(world, "train", transform=ClipTransform("targetpad", size, mean=mean, std=std))
    ids = list(train.gallery_ids)
    images = torch.cat([train.images.batch(ids[i:i + 1000]) for i in range(0, len(ids), 1000)])  # (N, 3, S, S)
    vocabulary = words_of([s["caption"] for s in scenes.values()] + [t.texts[0] for t in train.triplets])
    return pretrain_tiny_clip(out_dir, images, [scenes[i]["caption"] for i in ids], epochs=epochs,
                              batch_size=batch_size, lr=lr, seed=seed, device=device, image_size=size, mean=mean,
                              std=std, vocabulary=vocabulary, show_progress=show_progress, **config_kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python examples/_tiny_clip.py --world DIR --out DIR``: a tiny CLIP checkpoint for the examples."""
    import argparse

    parser = argparse.ArgumentParser(description="pretrain a tiny CLIP on a synthetic world and save it by path")
    parser.add_argument("--world", required=True, help="synthetic world root (cir-plugins world --root DIR)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--patch-size", type=int, default=None,
                        help="ViT patch side; default a third of the image side (one patch per grid cell) when it "
                             "divides, else a quarter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = pretrain_on_world(args.world, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, device=args.device, patch_size=args.patch_size)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
