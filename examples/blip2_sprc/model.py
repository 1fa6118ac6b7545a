"""An SPRC-style composed-image-retrieval model on the BLIP-2 Q-Former (transformers).

This file knows nothing about cir_plugins: it is the kind of model a user already has.
``wrap.py`` (at most 10 lines) plugs it into the library.

How a query is built (SPRC, docs/method.md section 4):

1. Fusion pass (``fusion_prompt``). The Q-Former's 32 learned query tokens, followed by the
   modification text, go through the *original* Q-Former with cross-attention to the reference
   image's vision features. The 32 query outputs are the "prompt": the reference image as read
   through the text, (B, 32, H).
2. Image-free pass (``compose``). The prompt, followed by the same text, goes through the *copy* of
   the Q-Former (``query_qformer`` with ``query_embeddings``), without the image and with
   ``query_length=0``, so every token (prompt included) takes the text feed-forward, as SPRC's
   modified Q-Former does.
3. query = normalize(text_projection(hidden state at the text's [CLS], i.e. position 32)).

A gallery image is 32 tokens of 256 dims: normalize(vision_projection(Q-Former query outputs over
the image)); a query scores an image by the max over its 32 tokens.

Stage 2 of SPN (the method's SPRC row) trains only the copy, ``text_projection`` and the temperature;
the vision tower, the query tokens, the original Q-Former with its text embeddings (the fusion pass)
and the vision projection stay frozen. Because the fusion pass is frozen and reads the text,
``fusion_prompt(images, texts)`` is the model's reference side (``reference_uses_text = True``): stage 2
caches its (32, H) output once per (reference id, text) and a step runs only the image-free pass.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["SPRCRetriever", "clean_caption", "make_tiny_checkpoint"]

_CAPTION_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def clean_caption(text: str, max_words: int = 50) -> str:
    """The text cleaning SPRC applies to every modification text (LAVIS's ``blip_caption`` processor):
    lower case; each of ``. ! " ( ) * # : ; ~`` becomes a space; runs of two or more whitespace characters
    become one space; surrounding spaces go; at most ``max_words`` space-separated words are kept."""
    text = _CAPTION_PUNCTUATION.sub(" ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


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


class SPRCRetriever(nn.Module):
    """SPRC composed retrieval on a ``Blip2ForImageTextRetrieval``.

    Attributes:
        blip: the ``Blip2ForImageTextRetrieval`` (vision tower, query tokens, Q-Former, projections).
        query_qformer: the copy of ``blip.qformer`` used to compose queries (trained in stage 2).
        query_embeddings: the copy of ``blip.embeddings`` (word + position embeddings of the text).
        tokenizer: the Q-Former's BERT tokenizer.
        image_processor: the checkpoint's image processor (PIL image -> pixel values), or None.
    """

    # the frozen reference side (fusion_prompt) reads the text: cached per (reference id, text)
    reference_uses_text = True
    similarity = "max_token"

    def __init__(self, blip: nn.Module, tokenizer, image_processor=None, *, max_text_length: int = 32,
                 clean_texts: bool = True) -> None:
        super().__init__()
        qformer_config = blip.config.qformer_config
        if not getattr(qformer_config, "use_qformer_text_input", False):
            raise ValueError(
                "this BLIP-2 checkpoint's Q-Former has no text feed-forward "
                f"(qformer_config.use_qformer_text_input={qformer_config.use_qformer_text_input!r}); "
                "expected True, as in the image-text retrieval checkpoints (e.g. Salesforce/blip2-itm-vit-g). "
                "Fix: load a Blip2ForImageTextRetrieval checkpoint.")
        if getattr(blip.config, "image_token_index", None) is not None:
            logger.info("ignoring image_token_index=%s: this model passes the query tokens itself",
                        blip.config.image_token_index)
        self.blip = blip
        self.query_qformer = copy.deepcopy(blip.qformer)
        self.query_embeddings = copy.deepcopy(blip.embeddings)
        self.tokenizer = tokenizer
        self._warned_truncation = False  # one truncation warning per model
        self.image_processor = image_processor
        self.max_text_length = min(int(max_text_length), int(qformer_config.max_position_embeddings))
        self.clean_texts = bool(clean_texts)  # SPRC's caption cleaning (clean_caption) before tokenising

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, max_text_length: int = 32, clean_texts: bool = True,
                        trust_remote_code: bool = False, **kwargs) -> SPRCRetriever:
        """Load a Hub name or a local directory holding a BLIP-2 retrieval checkpoint + tokenizer.

        ``trust_remote_code`` stays off unless the caller turns it on; ``kwargs`` go to
        ``Blip2ForImageTextRetrieval.from_pretrained`` (e.g. ``dtype``).
        """
        from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForImageTextRetrieval

        blip = Blip2ForImageTextRetrieval.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code,
                                                          **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        try:
            image_processor = AutoImageProcessor.from_pretrained(str(name_or_path),
                                                                 trust_remote_code=trust_remote_code)
        except OSError:  # a checkpoint without preprocessor_config.json: the caller brings a transform
            logger.warning("no image processor in %s; pixel values must be prepared by the caller", name_or_path)
            image_processor = None
        return cls(blip.eval(), tokenizer, image_processor, max_text_length=max_text_length, clean_texts=clean_texts)

    # ------------------------------------------------------------------------------------ images
    def preprocess_settings(self) -> dict:
        """{"size", "mean", "std"} of the checkpoint's image processor, for SPRC's targetpad transform
        (pad to aspect ratio <= 1.25, resize, centre-crop, normalise); the transform itself is the caller's."""
        processor = self.image_processor
        if processor is None:
            raise ValueError("this model was loaded without an image processor, so its image size and "
                             "normalisation are unknown; Fix: save one next to the checkpoint.")
        size = getattr(processor, "size", None)
        side = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
        side = side or int(self.blip.config.vision_config.image_size)
        return {"size": int(side), "mean": [float(v) for v in processor.image_mean],
                "std": [float(v) for v in processor.image_std]}

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision-tower output: (N, 3, S, S) -> (N, P, Dv), P = patches + 1."""
        return self.blip.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Gallery embedding: (N, 3, S, S) -> (N, 32, 256), each token L2-normalised."""
        features = self.vision_features(pixel_values)  # (N, P, Dv)
        n = features.shape[0]
        queries = self.blip.query_tokens.expand(n, -1, -1)  # (1, 32, H) -> (N, 32, H)
        visual_mask = torch.ones(features.shape[:-1], dtype=torch.long, device=features.device)  # (N, P)
        hidden = self.blip.qformer(query_embeds=queries, encoder_hidden_states=features,
                                   encoder_attention_mask=visual_mask).last_hidden_state  # (N, 32, H)
        hidden = hidden.to(self.blip.vision_projection.weight.dtype)
        return F.normalize(self.blip.vision_projection(hidden), dim=-1)  # (N, 32, H) @ (H, 256) -> (N, 32, 256)

    # ----------------------------------------------------------------------------------- queries
    def _tokenize(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [clean_caption(t) for t in texts] if self.clean_texts else list(texts)
        batch = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_text_length,
                               return_tensors="pt")
        warn_if_truncated(self, self.tokenizer, list(texts), batch["attention_mask"], self.max_text_length)
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, L) each

    def _joint_mask(self, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) text mask -> (B, 32 + L): the 32 prompt/query positions are always attended."""
        n_query = self.blip.query_tokens.shape[1]
        ones = torch.ones(text_mask.shape[0], n_query, dtype=text_mask.dtype, device=text_mask.device)
        return torch.cat([ones, text_mask], dim=1)

    def fusion_prompt(self, pixel_values: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Frozen fusion pass (the reference side): (B, 3, S, S) + B texts -> prompt (B, 32, H).

        [32 query tokens | text] through the *original* Q-Former (its own text embeddings) with
        cross-attention to the reference image's vision features; the 32 query outputs are the prompt.
        """
        if pixel_values.shape[0] != len(texts):
            raise ValueError(f"expected B reference images and B texts; got {pixel_values.shape[0]} images and "
                             f"{len(texts)} texts")
        features = self.vision_features(pixel_values)  # (B, P, Dv)
        device = features.device
        input_ids, text_mask = self._tokenize(texts, device)  # (B, L)
        n_query = self.blip.query_tokens.shape[1]
        queries = self.blip.query_tokens.expand(input_ids.shape[0], -1, -1)  # (1, 32, H) -> (B, 32, H)
        visual_mask = torch.ones(features.shape[:-1], dtype=torch.long, device=device)  # (B, P)
        fusion_in = self.blip.embeddings(input_ids=input_ids, query_embeds=queries)  # (B, 32 + L, H)
        fused = self.blip.qformer(query_embeds=fusion_in, query_length=n_query,
                                  attention_mask=self._joint_mask(text_mask), encoder_hidden_states=features,
                                  encoder_attention_mask=visual_mask).last_hidden_state  # (B, 32 + L, H)
        return fused[:, :n_query, :]  # (B, 32, H): the 32 query outputs

    def compose(self, prompt: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Image-free pass on the trainable copy: prompt (B, 32, H) from ``fusion_prompt`` + B texts ->
        query (B, 256), L2-normalised."""
        n_query, hidden_size = self.blip.query_tokens.shape[1:]
        if prompt.dim() != 3 or tuple(prompt.shape[1:]) != (n_query, hidden_size) or prompt.shape[0] != len(texts):
            raise ValueError(f"expected a prompt (B, {n_query}, {hidden_size}) from fusion_prompt and B texts; got "
                             f"{tuple(prompt.shape)} and {len(texts)} texts")
        input_ids, text_mask = self._tokenize(texts, prompt.device)  # (B, L)
        # [prompt | text]; query_length=0 sends every token through the text FFN.
        text_in = self.query_embeddings(input_ids=input_ids, query_embeds=prompt)  # (B, 32 + L, H)
        hidden = self.query_qformer(query_embeds=text_in, query_length=0,
                                    attention_mask=self._joint_mask(text_mask)).last_hidden_state  # (B, 32 + L, H)
        cls = hidden[:, n_query, :].to(self.blip.text_projection.weight.dtype)  # (B, H): the text's [CLS]
        return F.normalize(self.blip.text_projection(cls), dim=-1)  # (B, H) @ (H, 256) -> (B, 256)

    def forward(self, pixel_values: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Query from raw reference images: (B, 3, S, S) + B texts -> (B, 256)."""
        return self.compose(self.fusion_prompt(pixel_values, texts), texts)


def make_tiny_checkpoint(path: str | Path, words: Sequence[str] = (), *, image_size: int = 32,
                         seed: int = 0) -> Path:
    """Write a tiny random BLIP-2 retrieval checkpoint (model + tokenizer + image processor) to ``path``.

    For tests and demos on a CPU: 1 vision layer, 2 Q-Former layers of width 32, still 32 query
    tokens and 256-d projections. The BERT word-piece vocabulary holds the special tokens, ``words``
    and single characters (so any lowercase text tokenises). Load it back with
    ``SPRCRetriever.from_pretrained(path)``.
    """
    from transformers import BertTokenizerFast, Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,;:!?'-/()"]
    vocab += chars + [f"##{c}" for c in chars]
    vocab += sorted({w.lower() for w in words if w.strip()} - set(vocab))
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(path))

    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=len(vocab), max_position_embeddings=64, encoder_hidden_size=32,
                            cross_attention_frequency=1, use_qformer_text_input=True,
                            pad_token_id=0),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                         word_embed_proj_dim=16, vocab_size=64),
        num_query_tokens=32, image_text_hidden_size=256)
    Blip2ForImageTextRetrieval(config).save_pretrained(str(path))
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(path))
    return path
