"""A composed-retrieval model that no CIR paper ships: a timm image backbone, a transformers text
encoder, and TIRG-style composition (a gate that keeps part of the image plus a residual).

This file knows nothing about cir_plugins: it is the kind of model a user already has.
``wrap.py`` (at most 10 lines) plugs it into the library.

    image side   x = image_projection(backbone(image))                       (N, D)
    text side    t = text_projection(text_encoder(text)[CLS])                (B, D)
    composition  q = normalize(w_g * sigmoid(gate([x, t])) * x + w_r * residual([x, t]))
    target       normalize(x) for the target image                            (N, D)

Stage 2 of SPN trains the text encoder, the text projection and the composition; the backbone and
the image projection make the gallery embeddings and stay frozen.

A checkpoint directory holds ``tirg.json`` (dims and options), ``image/`` (timm's Hub layout:
config.json + model.safetensors, loaded with ``timm.create_model("local-dir:...")``), ``text/``
(transformers ``save_pretrained`` of the encoder and its tokenizer) and ``heads.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["TimmTIRG", "make_tiny_checkpoint"]


def warn_if_truncated(model, tokenizer, texts, attention_mask, limit: int) -> None:
    """Log one warning per model the first time a text is cut to ``limit`` tokens.

    ``attention_mask`` (B, L) is the truncated batch's mask: only rows that fill all ``limit``
    positions can have been cut, and only those are tokenised again (without truncation) to be sure,
    so texts that fit cost nothing extra and later batches cost nothing once the warning is out.
    """
    if getattr(model, "_warned_truncation", False) or attention_mask.shape[1] < limit:
        return
    for text, kept in zip(texts, attention_mask.sum(dim=1).tolist()):  # tokens kept per text
        if kept < limit:
            continue
        full = len(tokenizer(text, truncation=False, verbose=False)["input_ids"])
        if full > limit:
            model._warned_truncation = True
            logger.warning("a text of %d tokens was truncated to the tokenizer limit of %d tokens (%r...); "
                           "later truncations by this model are not reported", full, limit, text[:60])
            return

_POOLINGS = ("cls", "mean")


class TimmTIRG(nn.Module):
    """timm backbone + transformers text encoder + TIRG composition.

    Args:
        image_backbone: a timm model created with ``num_classes=0`` (pooled features, (N, F)).
        text_encoder: a transformers encoder whose output has ``last_hidden_state`` (B, L, H).
        tokenizer: the text encoder's tokenizer.
        embed_dim: D, the joint embedding width.
        text_pooling: "cls" (first token) or "mean" (masked mean over tokens).
        max_text_length: tokens kept per text.
    """

    def __init__(self, image_backbone: nn.Module, text_encoder: nn.Module, tokenizer, *, embed_dim: int = 64,
                 text_pooling: str = "cls", max_text_length: int = 32) -> None:
        super().__init__()
        if text_pooling not in _POOLINGS:
            raise ValueError(f"text_pooling must be one of {_POOLINGS}; got {text_pooling!r}")
        if int(embed_dim) < 1:
            raise ValueError(f"embed_dim must be a positive int; got {embed_dim!r}")
        self.image_backbone = image_backbone
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._warned_truncation = False  # one truncation warning per model
        self.embed_dim = int(embed_dim)
        self.text_pooling = text_pooling
        self.max_text_length = int(max_text_length)
        d = self.embed_dim
        self.image_projection = nn.Linear(image_backbone.num_features, d)
        self.text_projection = nn.Linear(text_encoder.config.hidden_size, d)
        self.gate = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.residual = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.gate_weight = nn.Parameter(torch.tensor(1.0))
        self.residual_weight = nn.Parameter(torch.tensor(1.0))

    # ------------------------------------------------------------------------------------ images
    def image_transform(self):
        """timm's eval transform for the backbone: PIL image -> (3, S, S) float tensor."""
        import timm.data

        config = timm.data.resolve_data_config({}, model=self.image_backbone)
        return timm.data.create_transform(**config)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, D), unnormalised: the reference side of a query."""
        pooled = self.image_backbone(pixel_values)  # (N, F): num_classes=0 gives pooled features
        return self.image_projection(pooled)  # (N, F) @ (F, D) -> (N, D)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Gallery embedding: (N, 3, S, S) -> (N, D), L2-normalised."""
        return F.normalize(self.image_features(pixel_values), dim=-1)

    # ----------------------------------------------------------------------------------- queries
    def embed_text(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """B texts -> (B, D), unnormalised."""
        batch = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_text_length,
                               return_tensors="pt")
        warn_if_truncated(self, self.tokenizer, list(texts), batch["attention_mask"], self.max_text_length)
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        hidden = self.text_encoder(**batch).last_hidden_state  # (B, L, H)
        if self.text_pooling == "cls":
            pooled = hidden[:, 0, :]  # (B, H)
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, H)
        return self.text_projection(pooled)  # (B, H) @ (H, D) -> (B, D)

    def compose(self, reference_features: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """TIRG query: reference features (B, D) + B texts -> (B, D), L2-normalised."""
        if reference_features.dim() != 2 or reference_features.shape[0] != len(texts):
            raise ValueError(f"expected reference features (B, D) and B texts; got "
                             f"{tuple(reference_features.shape)} and {len(texts)} texts")
        text = self.embed_text(texts, reference_features.device)  # (B, D)
        joint = torch.cat([reference_features, text], dim=-1)  # (B, 2D)
        kept = torch.sigmoid(self.gate(joint)) * reference_features  # (B, D): gated image
        return F.normalize(self.gate_weight * kept + self.residual_weight * self.residual(joint), dim=-1)

    def forward(self, pixel_values: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Query from raw reference images: (B, 3, S, S) + B texts -> (B, D)."""
        return self.compose(self.image_features(pixel_values), texts)

    # ----------------------------------------------------------------------------------- loading
    def _head_state(self) -> dict[str, torch.Tensor]:
        heads = ("image_projection", "text_projection", "gate", "residual", "gate_weight", "residual_weight")
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k.split(".")[0] in heads}

    @classmethod
    def build(cls, image_model: str, text_model: str | Path, *, pretrained: bool = True, embed_dim: int = 64,
              image_size: int | None = None, text_pooling: str = "cls", max_text_length: int = 32,
              trust_remote_code: bool = False) -> TimmTIRG:
        """A fresh model (random heads) from a timm model name and a transformers name or path."""
        import timm
        from transformers import AutoModel, AutoTokenizer

        overlay = {"input_size": (3, image_size, image_size)} if image_size else None
        backbone = timm.create_model(image_model, pretrained=pretrained, num_classes=0,
                                     pretrained_cfg_overlay=overlay)
        text = AutoModel.from_pretrained(str(text_model), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(text_model), trust_remote_code=trust_remote_code)
        return cls(backbone, text, tokenizer, embed_dim=embed_dim, text_pooling=text_pooling,
                   max_text_length=max_text_length)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, trust_remote_code: bool = False) -> TimmTIRG:
        """Load a directory written by :meth:`save_pretrained`."""
        import timm
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "tirg.json").is_file():
            raise FileNotFoundError(f"{path} is not a TimmTIRG checkpoint (no tirg.json); "
                                    "Fix: point at a directory written by TimmTIRG.save_pretrained")
        options = json.loads((path / "tirg.json").read_text(encoding="utf-8"))
        backbone = timm.create_model(f"local-dir:{path / 'image'}", pretrained=True, num_classes=0)
        text = AutoModel.from_pretrained(str(path / "text"), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(path / "text"), trust_remote_code=trust_remote_code)
        model = cls(backbone, text, tokenizer, **options)
        missing, unexpected = model.load_state_dict(load_file(str(path / "heads.safetensors")), strict=False)
        missing = [k for k in missing if k.split(".")[0] not in ("image_backbone", "text_encoder")]
        if missing or unexpected:
            raise ValueError(f"heads.safetensors in {path} does not match this model: "
                             f"missing {missing}, unexpected {unexpected}")
        return model.eval()

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the checkpoint directory (safetensors + JSON; the head file and tirg.json atomically)."""
        from safetensors.torch import save_file
        from timm.models import save_for_hf

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_for_hf(self.image_backbone, str(path / "image"), safe_serialization=True)
        self.text_encoder.save_pretrained(str(path / "text"))
        self.tokenizer.save_pretrained(str(path / "text"))
        tmp = path / f"heads.safetensors.tmp-{os.getpid()}"
        save_file(self._head_state(), str(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path / "heads.safetensors")
        options = {"embed_dim": self.embed_dim, "text_pooling": self.text_pooling,
                   "max_text_length": self.max_text_length}
        tmp = path / f"tirg.json.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(options, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path / "tirg.json")
        return path


def make_tiny_checkpoint(path: str | Path, words: Sequence[str] = (), *, image_model: str = "test_resnet",
                         image_size: int = 32, embed_dim: int = 48, seed: int = 0) -> Path:
    """Write a tiny random TimmTIRG checkpoint to ``path`` (tests and CPU demos).

    The image side is timm's ``image_model`` (random weights, ``pretrained=False``) at
    ``image_size``; the text side a 2-layer BERT of width 32, saved with ``save_pretrained`` and
    loaded back by path, with a word-piece vocabulary of ``words`` plus single characters.
    """
    import timm
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    torch.manual_seed(seed)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,;:!?'-/()"]
    vocab += chars + [f"##{c}" for c in chars]
    vocab += sorted({w.lower() for w in words if w.strip()} - set(vocab))
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    text = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    backbone = timm.create_model(image_model, pretrained=False, num_classes=0,
                                 pretrained_cfg_overlay={"input_size": (3, image_size, image_size)})
    model = TimmTIRG(backbone, text, tokenizer, embed_dim=embed_dim)
    model.save_pretrained(path)
    return path
