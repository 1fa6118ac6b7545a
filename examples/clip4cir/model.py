"""CLIP4Cir (Baldrati et al.) on ``transformers.CLIPModel``: a self-contained model file.

This file deliberately does not import ``cir_plugins``: it is the kind of model a user already has.
``wrap.py`` next to it is the whole integration (a few lines).

Shapes: B queries, N images, D = CLIP projection dim, C/H/W image channels and size.

- ``encode_image(images (N, C, H, W)) -> (N, D)``: L2-normalised CLIP image features (the target side).
- ``encode_reference(images (B, C, H, W)) -> (B, D)``: raw (unnormalised) CLIP image features of the
  reference, exactly what the fusion consumes; frozen in stage 2, so they can be cached per image.
- ``compose_query(reference (B, D), texts: list[str]) -> (B, D)``: fusion of the reference features and
  the text features, L2-normalised. Fusion is either the Combiner or the element-wise sum.

Two backbones: a ``transformers.CLIPModel`` (the default), or an OpenAI-format CLIP through ``open_clip``
(:class:`OpenCLIPBackbone`, optional extra ``open_clip``) for the checkpoints CLIP4Cir publishes
(OpenAI CLIP RN50x4 weights). ``convert.py`` turns those ``torch.save`` files into a folder that
``CLIP4Cir.from_pretrained`` reads (``open_clip.safetensors`` + ``combiner.safetensors`` + ``clip4cir.json``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Combiner", "CLIP4Cir", "FUSIONS", "OPEN_CLIP_WEIGHTS", "OpenCLIPBackbone", "OpenCLIPTokenizer",
           "features_of", "preprocess_settings"]

# the file that marks a converted folder as an open_clip (OpenAI-format) CLIP
OPEN_CLIP_WEIGHTS = "open_clip.safetensors"


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

FUSIONS = ("combiner", "sum")


def save_tensors(tensors: dict, path: str) -> None:
    """Write tensors as one safetensors file atomically (temporary file in the same folder, fsync, rename)."""
    import os

    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def features_of(output) -> torch.Tensor:
    """The projected features from ``get_image_features`` / ``get_text_features``.

    transformers 4.x returns the (N, D) tensor itself; 5.x returns an output object whose
    ``pooler_output`` holds the projected (N, D) features. Anything else is an error.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]  # return_dict=False tuple: (last_hidden_state, pooler_output, ...)
    raise TypeError(f"CLIP feature call returned {type(output).__name__}; expected a tensor (transformers 4.x) "
                    "or an output with .pooler_output (5.x). Fix: check the installed transformers version.")


class Combiner(nn.Module):
    """CLIP4Cir's Combiner.

    Each input -> Linear(D, P) + ReLU + Dropout(0.5); concat (text first) (B, 2P) ->
    Linear(2P, H) + ReLU + Dropout(0.5) -> Linear(H, D); a gate lambda = sigmoid(MLP(concat)) (B, 1);
    output = mlp + lambda * text + (1 - lambda) * image, L2-normalised (B, D). P = 4D, H = 8D by default.
    """

    def __init__(self, dim: int, projection_dim: int | None = None, hidden_dim: int | None = None,
                 dropout: float = 0.5) -> None:
        super().__init__()
        projection_dim = projection_dim or 4 * dim
        hidden_dim = hidden_dim or 8 * dim
        self.text_projection = nn.Linear(dim, projection_dim)
        self.image_projection = nn.Linear(dim, projection_dim)
        self.dropout_text = nn.Dropout(dropout)
        self.dropout_image = nn.Dropout(dropout)
        self.combiner_layer = nn.Linear(2 * projection_dim, hidden_dim)
        self.dropout_combined = nn.Dropout(dropout)
        self.output_layer = nn.Linear(hidden_dim, dim)
        self.gate = nn.Sequential(nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden_dim, 1), nn.Sigmoid())

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """image_features (B, D), text_features (B, D) -> normalised (B, D)."""
        text_projected = self.dropout_text(F.relu(self.text_projection(text_features)))  # (B, P)
        image_projected = self.dropout_image(F.relu(self.image_projection(image_features)))  # (B, P)
        joint = torch.cat([text_projected, image_projected], dim=-1)  # (B, 2P), text first
        mlp = self.output_layer(self.dropout_combined(F.relu(self.combiner_layer(joint))))  # (B, D)
        gate = self.gate(joint)  # (B, 1)
        return F.normalize(mlp + gate * text_features + (1 - gate) * image_features, dim=-1)


def preprocess_settings(processor) -> dict:
    """Image size, mean and std from a CLIP image processor (or a processor that holds one).

    Returns {"size": int, "mean": [3 floats], "std": [3 floats]} for a targetpad transform.
    """
    image_processor = getattr(processor, "image_processor", processor)
    crop = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None)
    if isinstance(crop, int):
        size = crop
    else:  # a dict (transformers 4.x) or a SizeDict (5.x)
        get = crop.get if isinstance(crop, dict) else (lambda key: getattr(crop, key, None))
        size = get("height") or get("shortest_edge") or get("width")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(
            f"cannot read an image size from {type(image_processor).__name__} (crop_size/size = {crop!r}); "
            "expected a positive int. Fix: pass a CLIP image processor."
        )
    return {"size": int(size), "mean": [float(v) for v in image_processor.image_mean],
            "std": [float(v) for v in image_processor.image_std]}


class OpenCLIPTokenizer:
    """open_clip's CLIP BPE tokenizer (shipped with the package) behind the calls CLIP4Cir makes on a
    transformers tokenizer: ``tok(texts, padding=True, truncation=True, max_length=L, return_tensors="pt")``
    -> {"input_ids", "attention_mask"} (B, context_length), and ``tok(text, truncation=False)`` -> the full ids.

    Every row is padded (with 0) to the model's context length, as OpenAI CLIP's text tower expects; a text
    that does not fit keeps its first tokens and ends with the end-of-text token, like ``clip.tokenize(...,
    truncate=True)``.
    """

    def __init__(self, context_length: int = 77) -> None:
        import open_clip

        self.bpe = open_clip.SimpleTokenizer(context_length=context_length)
        self.model_max_length = int(context_length)

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt", verbose=None):
        if isinstance(texts, str) and not truncation:  # the untruncated ids of one text
            return {"input_ids": [self.bpe.sot_token_id, *self.bpe.encode(texts), self.bpe.eot_token_id]}
        texts = [texts] if isinstance(texts, str) else list(texts)
        keep = min(int(max_length or self.model_max_length), self.model_max_length)
        ids = torch.zeros(len(texts), self.model_max_length, dtype=torch.long)  # (B, context_length), 0 = padding
        ids[:, :keep] = self.bpe(texts, context_length=keep)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def save_pretrained(self, path) -> None:
        """Nothing to write: the BPE vocabulary ships with open_clip."""


class OpenCLIPBackbone(nn.Module):
    """An ``open_clip`` CLIP (OpenAI layout: ModifiedResNet or ViT image tower) with the surface CLIP4Cir
    uses on a ``transformers.CLIPModel``: ``get_image_features``, ``get_text_features``, ``config``
    (projection_dim, text_config.max_position_embeddings), ``vision_model``. Parameters keep OpenAI's names
    under ``model.`` (``model.visual.*``, ``model.transformer.*``, ``model.text_projection``, ...).
    """

    TEXT_PREFIXES = ("model.transformer", "model.token_embedding", "model.positional_embedding", "model.ln_final",
                     "model.text_projection")

    def __init__(self, model: nn.Module) -> None:
        from types import SimpleNamespace

        super().__init__()
        self.model = model
        self.config = SimpleNamespace(projection_dim=int(model.text_projection.shape[1]),
                                      text_config=SimpleNamespace(max_position_embeddings=int(model.context_length)))

    @classmethod
    def from_openai_state_dict(cls, state_dict: dict) -> OpenCLIPBackbone:
        """Build the architecture the OpenAI-format ``state_dict`` describes (RN50x4 or any size, inferred
        from the tensor shapes; QuickGELU as OpenAI trained) and load it in float32, exactly."""
        from open_clip.model import build_model_from_openai_state_dict

        state_dict = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length",
                                                                       "vocab_size")}
        model = build_model_from_openai_state_dict(dict(state_dict), quick_gelu=True).float()
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
        return cls(model.eval())

    @property
    def vision_model(self) -> nn.Module:
        return self.model.visual

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> raw projected image features (N, D)."""
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, context_length) token ids -> raw projected text features (B, D) at the end-of-text token."""
        return self.model.encode_text(input_ids)

    def save_pretrained(self, path) -> None:
        """Write the OpenAI-named weights to ``{path}/open_clip.safetensors`` (atomically)."""
        import os

        save_tensors(self.model.state_dict(), os.path.join(str(path), OPEN_CLIP_WEIGHTS))


class CLIP4Cir(nn.Module):
    """CLIP4Cir: CLIP image and text towers plus a fusion ("combiner" or "sum").

    Args:
        clip: a ``transformers.CLIPModel`` (or a CLIP-like subclass such as the examples' conv-tower tiny CLIP),
            or an :class:`OpenCLIPBackbone` (OpenAI-format CLIP through open_clip).
        tokenizer: its tokenizer (any fast or slow HF tokenizer).
        fusion: "combiner" (the Combiner, stage-2 of CLIP4Cir's own training) or "sum"
            (normalize(image + text), the variant CLIP4Cir uses when fine-tuning CLIP and the SPN release uses).
        max_length: text truncation length; default the tokenizer's limit capped at the text tower's
            position embeddings.
        preprocess: {"size", "mean", "std"} for the targetpad transform (from ``preprocess_settings``).
    """

    similarity = "dot"

    def __init__(self, clip, tokenizer, *, fusion: str = "combiner", max_length: int | None = None,
                 preprocess: dict | None = None, combiner_dims: tuple[int, int] | None = None) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}. Fix: pick one.")
        self.clip = clip
        self.tokenizer = tokenizer
        self._warned_truncation = False  # one truncation warning per model
        self.fusion = fusion
        dim = int(clip.config.projection_dim)
        self.combiner = Combiner(dim, *(combiner_dims or ()))  # (projection, hidden) dims; default 4d, 8d
        positions = int(clip.config.text_config.max_position_embeddings)
        limit = getattr(tokenizer, "model_max_length", None) or positions
        self.max_length = int(min(max_length or limit, limit, positions))
        self.preprocess = dict(preprocess) if preprocess else None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, fusion: str | None = None, combiner_path: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> CLIP4Cir:
        """Load CLIP, its tokenizer and image processor from a hub name or a local directory.

        The model is built by ``AutoModel``: ``CLIPModel`` for every CLIP checkpoint, or a CLIP-like class
        registered with ``AutoModel`` by the caller's own code (the examples' tiny conv-tower CLIP); it must
        have CLIP's ``get_image_features`` / ``get_text_features``, towers and projections.
        ``combiner_path``: an optional safetensors file with Combiner weights (saved by ``save_combiner``).
        ``trust_remote_code`` is never set: no code is downloaded with a checkpoint.
        A folder holding ``open_clip.safetensors`` (written by ``convert.py`` from CLIP4Cir's published
        checkpoints) is loaded on the open_clip backbone instead (:meth:`from_open_clip`).
        ``fusion``: default "combiner" (an open_clip folder: the fusion its ``clip4cir.json`` names).
        """
        from pathlib import Path

        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if (Path(name_or_path) / OPEN_CLIP_WEIGHTS).is_file():
            return cls.from_open_clip(name_or_path, fusion=fusion, combiner_path=combiner_path, **kwargs)
        fusion = fusion or "combiner"

        clip = AutoModel.from_pretrained(name_or_path, **({"dtype": torch_dtype} if torch_dtype else {}))
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        model = cls(clip, tokenizer, fusion=fusion, preprocess=preprocess_settings(processor), **kwargs)
        if combiner_path:
            model.load_combiner(combiner_path)
        logger.info("loaded CLIP4Cir(%s, fusion=%s, dim=%d)", name_or_path, fusion, model.dim)
        return model

    @classmethod
    def from_openai_state_dict(cls, state_dict: dict, *, fusion: str = "combiner",
                               combiner_state: dict | None = None, **kwargs) -> CLIP4Cir:
        """CLIP4Cir on an OpenAI-format CLIP state dict (open_clip backbone, float32), optionally with
        Combiner weights in this file's names; preprocessing: targetpad at the tower's size, OpenAI's
        mean / std."""
        import open_clip

        backbone = OpenCLIPBackbone.from_openai_state_dict(state_dict)
        preprocess = {"size": backbone.image_size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                      "std": list(open_clip.OPENAI_DATASET_STD)}
        dims = None
        if combiner_state is not None:  # (projection, hidden) from the saved shapes (CLIP4Cir: 2560, 5120)
            dims = (int(combiner_state["text_projection.weight"].shape[0]),
                    int(combiner_state["combiner_layer.weight"].shape[0]))
        model = cls(backbone, OpenCLIPTokenizer(backbone.config.text_config.max_position_embeddings), fusion=fusion,
                    preprocess=preprocess, combiner_dims=dims, **kwargs)
        if combiner_state is not None:
            model.combiner.load_state_dict(combiner_state)
        return model.eval()

    @classmethod
    def from_open_clip(cls, path, *, fusion: str | None = None, combiner_path: str | None = None,
                       **kwargs) -> CLIP4Cir:
        """Load a folder written by ``convert.py`` (``open_clip.safetensors``, optional ``combiner.safetensors``);
        ``fusion`` defaults to the one its ``clip4cir.json`` names, else "combiner"."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        folder = Path(path)
        meta = folder / "clip4cir.json"
        fusion = fusion or (json.loads(meta.read_text()).get("fusion") if meta.is_file() else None) or "combiner"
        combiner_file = Path(combiner_path) if combiner_path else folder / "combiner.safetensors"
        combiner_state = load_file(str(combiner_file)) if combiner_file.is_file() else None
        model = cls.from_openai_state_dict(load_file(str(folder / OPEN_CLIP_WEIGHTS)), fusion=fusion,
                                           combiner_state=combiner_state, **kwargs)
        logger.info("loaded CLIP4Cir(%s, open_clip backbone, fusion=%s, dim=%d)", folder, fusion, model.dim)
        return model

    def save_combiner(self, path: str) -> None:
        """Write the Combiner's weights as safetensors, atomically."""
        save_tensors(self.combiner.state_dict(), path)

    def load_combiner(self, path: str) -> None:
        from safetensors.torch import load_file

        self.combiner.load_state_dict(load_file(path))

    @property
    def dim(self) -> int:
        return int(self.clip.config.projection_dim)

    # ---------------------------------------------------------------- features
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) preprocessed -> raw projected CLIP image features (N, D)."""
        dtype = next(self.clip.vision_model.parameters()).dtype
        return features_of(self.clip.get_image_features(pixel_values=images.to(dtype)))

    def tokenize(self, texts: Sequence[str]) -> dict:
        """texts -> input_ids / attention_mask (B, L), truncated at ``max_length``, on the model's device."""
        device = next(self.clip.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        warn_if_truncated(self, self.tokenizer, list(texts), batch["attention_mask"], self.max_length)
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """texts (B strings) -> raw projected CLIP text features (B, D)."""
        return features_of(self.clip.get_text_features(**self.tokenize(texts)))

    # ---------------------------------------------------------------- CIR protocol
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Target side: images (N, C, H, W) -> L2-normalised (N, D)."""
        return F.normalize(self.image_features(images), dim=-1)

    def encode_reference(self, images: torch.Tensor) -> torch.Tensor:
        """Reference side, frozen in stage 2: images (B, C, H, W) -> raw image features (B, D)."""
        return self.image_features(images)

    def compose_query(self, reference: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """reference features (B, D) from ``encode_reference`` + B texts -> normalised query (B, D)."""
        if reference.dim() != 2 or reference.shape[0] != len(texts):
            raise ValueError(f"compose_query got reference of shape {tuple(reference.shape)} and {len(texts)} texts; "
                             "expected (B, D) features from encode_reference and B texts.")
        text = self.text_features(texts)  # (B, D)
        image = reference.to(text.dtype)
        if self.fusion == "sum":
            return F.normalize(image + text, dim=-1)
        return self.combiner(image, text)

    def forward(self, reference_images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Full query from pixels: (B, C, H, W) + B texts -> (B, D)."""
        return self.compose_query(self.encode_reference(reference_images), texts)

    # ---------------------------------------------------------------- parameter groups
    def text_tower_prefixes(self) -> list[str]:
        """Parameter-name prefixes of the text tower (text encoder + text projection): what stage 2 trains."""
        if isinstance(self.clip, OpenCLIPBackbone):
            return [f"clip.{prefix}" for prefix in OpenCLIPBackbone.TEXT_PREFIXES]
        return ["clip.text_model", "clip.text_projection"]

    def text_tower_parameters(self):
        """Names of the text tower's parameters (text encoder + text projection): what stage 2 trains."""
        prefixes = self.text_tower_prefixes()
        return [name for name, _ in self.named_parameters()
                if any(name == p or name.startswith(p + ".") for p in prefixes)]
