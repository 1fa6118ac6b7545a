"""An SPRC-style composed-image-retrieval model on the BLIP-2 Q-Former (transformers).

This file knows nothing about cir_plugins: it is the kind of model a user already has.
``wrap.py`` (at most 10 lines) plugs it into the library.

How a query is built (SPRC, METHOD.md section 4):

1. Fusion pass. The Q-Former's 32 learned query tokens, followed by the modification text, go
   through the Q-Former with cross-attention to the *reference* image's frozen vision features.
   The 32 query outputs are the "prompt": the reference image as read through the text.
2. Prompt + text pass. The prompt, followed by the same text, goes through the Q-Former again,
   this time without the image and with ``query_length=0``, so every token (prompt included)
   takes the text feed-forward, as SPRC's modified Q-Former does.
3. query = normalize(text_projection(hidden state at the text's [CLS], i.e. position 32)).

A gallery image is 32 tokens of 256 dims: normalize(vision_projection(Q-Former query outputs over
the image)); a query scores an image by the max over its 32 tokens.

Stage 2 of SPN trains a *copy* of the Q-Former (``query_qformer``, with its own text embeddings)
plus ``text_projection``; the original Q-Former, the query tokens, the vision tower and the vision
projection make the gallery embeddings and stay frozen. ``vision_features`` returns the frozen
vision-tower output for a reference image, so a training step can start from cached features and
still fuse them with the triplet's own text, exactly as at inference.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["SPRCRetriever", "make_tiny_checkpoint"]


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

    def __init__(self, blip: nn.Module, tokenizer, image_processor=None, *, max_text_length: int = 64) -> None:
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

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, max_text_length: int = 64,
                        trust_remote_code: bool = False, **kwargs) -> "SPRCRetriever":
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
        return cls(blip.eval(), tokenizer, image_processor, max_text_length=max_text_length)

    # ------------------------------------------------------------------------------------ images
    def preprocess(self, image) -> torch.Tensor:
        """PIL image -> pixel values (3, S, S) with the checkpoint's image processor."""
        if self.image_processor is None:
            raise ValueError("this model was loaded without an image processor; "
                             "Fix: save one next to the checkpoint or preprocess images yourself.")
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

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
        batch = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_text_length,
                               return_tensors="pt")
        warn_if_truncated(self, self.tokenizer, list(texts), batch["attention_mask"], self.max_text_length)
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, L) each

    def compose(self, reference_features: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """SPRC query: reference vision features (B, P, Dv) + B texts -> (B, 256), L2-normalised."""
        if reference_features.dim() != 3 or reference_features.shape[0] != len(texts):
            raise ValueError(f"expected reference features (B, P, Dv) and B texts; got "
                             f"{tuple(reference_features.shape)} and {len(texts)} texts")
        device = reference_features.device
        input_ids, text_mask = self._tokenize(texts, device)  # (B, L)
        b = input_ids.shape[0]
        n_query = self.blip.query_tokens.shape[1]
        queries = self.blip.query_tokens.expand(b, -1, -1)  # (B, 32, H)
        joint_mask = torch.cat([torch.ones(b, n_query, dtype=text_mask.dtype, device=device), text_mask],
                               dim=1)  # (B, 32 + L)
        visual_mask = torch.ones(reference_features.shape[:-1], dtype=torch.long, device=device)  # (B, P)

        # 1. fusion pass: [32 queries | text] with cross-attention to the reference image.
        fusion_in = self.query_embeddings(input_ids=input_ids, query_embeds=queries)  # (B, 32 + L, H)
        fused = self.query_qformer(query_embeds=fusion_in, query_length=n_query, attention_mask=joint_mask,
                                   encoder_hidden_states=reference_features,
                                   encoder_attention_mask=visual_mask).last_hidden_state  # (B, 32 + L, H)
        prompt = fused[:, :n_query, :]  # (B, 32, H): the 32 query outputs

        # 2. image-free pass over [prompt | text]; query_length=0 sends every token through the text FFN.
        text_in = self.query_embeddings(input_ids=input_ids, query_embeds=prompt)  # (B, 32 + L, H)
        hidden = self.query_qformer(query_embeds=text_in, query_length=0,
                                    attention_mask=joint_mask).last_hidden_state  # (B, 32 + L, H)
        cls = hidden[:, n_query, :].to(self.blip.text_projection.weight.dtype)  # (B, H): the text's [CLS]
        return F.normalize(self.blip.text_projection(cls), dim=-1)  # (B, H) @ (H, 256) -> (B, 256)

    def forward(self, pixel_values: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Query from raw reference images: (B, 3, S, S) + B texts -> (B, 256)."""
        return self.compose(self.vision_features(pixel_values), texts)


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
