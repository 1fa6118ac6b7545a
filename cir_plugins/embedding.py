"""Embedding images and composing queries: where every layer above runs a model's towers (bar the bank's build)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._console import progress_bar
from ._utils import model_device
from .checks import check_positive_int, require_images
from .errors import ModelProtocolError, NonFiniteError, ShapeError, explain
from .protocol import compose, reference_input, reference_uses_text

__all__ = ["stack_images", "embed_images", "compose_batch", "compose_triplets", "reference_encoder"]

logger = logging.getLogger(__name__)


def reference_encoder(model: Any) -> Callable | None:
    """The model's ``encode_reference`` when it has one, else None."""
    encode_reference = getattr(model, "encode_reference", None)
    return encode_reference if callable(encode_reference) else None


def stack_images(images: Mapping[str, torch.Tensor], ids: Sequence[str],
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(n, C, H, W) tensor of ``ids`` from any Mapping (an ImageStore reads from disk), moved to ``device``
    when given."""
    batch = getattr(images, "batch", None)
    # an ImageStore in skip mode returns (tensor, kept ids) from .batch: one row per id is needed here
    use_batch = callable(batch) and getattr(images, "on_error", "error") == "error"
    pixels = batch(list(ids)) if use_batch else torch.stack([images[i] for i in ids])  # (n, C, H, W)
    return pixels if device is None else pixels.to(device, non_blocking=True)


def embed_images(encoder: Callable[[torch.Tensor], torch.Tensor], image_ids: Sequence[str],
                 images: Mapping[str, torch.Tensor], *, batch_size: int = 64,
                 device: torch.device | str | None = None, output_device: torch.device | str | None = None,
                 pool_tokens: bool = False, texts: Sequence[str] | None = None, show_progress: bool = True,
                 desc: str = "embed images") -> torch.Tensor:
    """Run ``encoder`` (e.g. ``model.encode_image``) over ``image_ids`` in batches, under no_grad; the package's
    one image-embedding loop (evaluation, pairing, generation, the training reference cache). The caller
    chooses eval mode. The argument order is that of ``NegativeBank.build`` and ``pair_images``.

    Args:
        encoder: images (n, C, H, W) -> (n, ...) tensor, one row per image; with ``texts``,
            ``encoder(images, texts)`` (protocol.reference_uses_text).
        image_ids: the ids to embed, in output order; images: id -> (C, H, W) tensor (any Mapping).
        device: where each batch goes; None = the encoder's device (the module of a bound method), or left
            where it is for a plain function or offloaded (meta) weights.
        output_device: where each output batch is moved before concatenation (e.g. "cpu"); None = kept.
        pool_tokens: mean-pool multi-vector outputs (n, T, D) -> (n, D); then outputs must be 2-D or 3-D.
        texts: one text per id (ids may then repeat), passed batch by batch beside the images.
        show_progress, desc: a tqdm bar and its label.

    Returns (len(image_ids), ...) in the encoder's dtype; (0, 0) for no ids. A missing id is a DataError,
    a wrong row count a ModelProtocolError, a NaN or infinity a NonFiniteError naming the images.
    """
    check_positive_int("batch_size", batch_size)
    if not callable(encoder):
        raise ModelProtocolError(explain("the image encoder must be callable (images (n, C, H, W) -> (n, D))",
                                         got=type(encoder).__name__, fix="pass a function or a model's encode_image"))
    image_ids = list(image_ids)
    require_images(images, image_ids)
    if texts is not None and len(texts) != len(image_ids):
        raise ShapeError(explain(f"{desc}: one text per image id is needed", got=(len(image_ids), len(texts))))
    device = torch.device(device) if device is not None else model_device(encoder, default=None)
    outputs = []
    with torch.no_grad():
        for start in progress_bar(range(0, len(image_ids), batch_size), desc=desc, show_progress=show_progress,
                                  leave=False, unit="batch"):
            ids = image_ids[start:start + batch_size]
            pixels = stack_images(images, ids, device)  # (n, C, H, W)
            out = encoder(pixels) if texts is None else encoder(pixels, list(texts[start:start + batch_size]))
            if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != len(ids) \
                    or (pool_tokens and out.dim() not in (2, 3)):
                raise ModelProtocolError(explain(f"{desc}: the encoder must return one row per image",
                                                 got=getattr(out, "shape", type(out).__name__),
                                                 expected=f"({len(ids)}, D)" + (f" or ({len(ids)}, T, D)"
                                                                                 if pool_tokens else ", ..."),
                                                 fix="return a (N, D) or (N, T, D) tensor"))
            if pool_tokens and out.dim() == 3:
                out = out.mean(dim=1)  # (n, T, D) -> (n, D): pool the tokens
            finite = torch.isfinite(out.reshape(len(ids), -1)).all(dim=1)  # (n,) one flag per image
            if not bool(finite.all()):
                bad = [i for i, ok in zip(ids, finite.tolist()) if not ok]
                raise NonFiniteError(explain(f"{desc}: the encoder returned NaN or infinity for {len(bad)} image(s)",
                                             got=bad[:10], expected="finite embeddings",
                                             fix="check those images (corrupt or constant pixels) or the model"))
            outputs.append(out.detach() if output_device is None else out.detach().to(output_device))
    return torch.cat(outputs) if outputs else torch.zeros(0, 0)


def _checked_queries(out: Any, n: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        raise ModelProtocolError(explain("compose_query must return a (B, D) tensor",
                                         got=getattr(out, "shape", type(out).__name__),
                                         expected=f"({n}, D)", fix="return one embedding per query"))
    return out


def compose_batch(model: Any, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Raw composed queries (n, D) of n reference images (n, C, H, W) and their texts (the caller chooses grad
    mode and normalisation)."""
    texts = list(texts)
    return _checked_queries(compose(model, reference_input(model, pixels, texts), texts), len(texts))


def compose_triplets(model: Any, images: Mapping[str, torch.Tensor], triplets: Sequence[Any], *, batch_size: int,
                     device: torch.device | str | None, show_progress: bool = False) -> torch.Tensor:
    """(Q, D) raw composed queries of ``triplets`` (``texts[0]`` each); references encoded once per distinct
    id when possible (per query batch when ``encode_reference`` reads the texts too)."""
    encode_reference = reference_encoder(model)
    require_images(images, [t.reference for t in triplets])
    cached = None
    if encode_reference is not None and not reference_uses_text(model):
        unique = list(dict.fromkeys(t.reference for t in triplets))
        head = unique[:batch_size]
        first = encode_reference(stack_images(images, head, device))
        if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] == len(head):
            rest = unique[batch_size:]
            parts = [first] + ([embed_images(encode_reference, rest, images, batch_size=batch_size, device=device,
                                             show_progress=show_progress, desc="evaluate: references")] if rest else [])
            cached = (torch.cat(parts), {r: i for i, r in enumerate(unique)})  # (R, ...) one row per reference id
        else:  # structured (non-tensor) features cannot be indexed by row: encode per query batch
            logger.debug("encode_reference returned %s; encoding references per query batch", type(first).__name__)
    outputs = []
    for start in progress_bar(range(0, len(triplets), batch_size), desc="evaluate: queries",
                              show_progress=show_progress, leave=False):
        chunk = triplets[start:start + batch_size]
        texts = [t.texts[0] for t in chunk]
        if cached is None:
            outputs.append(compose_batch(model, stack_images(images, [t.reference for t in chunk], device), texts))
        else:
            feats, index = cached
            reference = feats[torch.tensor([index[t.reference] for t in chunk], device=feats.device)]
            outputs.append(_checked_queries(compose(model, reference, texts), len(chunk)))
    return torch.cat(outputs)  # (Q, D)
