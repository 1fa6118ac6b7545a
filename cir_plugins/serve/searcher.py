"""Composed search over a saved bank, without any web framework: :class:`GallerySearcher`.

A query is a reference image (a gallery id, or an uploaded image) plus a modification text, composed by the
model (:func:`cir_plugins.embedding.compose_batch`), L2-normalised and searched exactly
(:func:`cir_plugins.metrics.topk_rows`) or through a FAISS index exported from the same bank. Every file is read
through the image store's checked open (root, symlinks, regular files only); a served file's content type comes
from the format in its header, never from its name.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .._utils import eval_mode, model_device
from ..checks import check_positive_int
from ..data.images import ImageStore, decode_image, to_rgb
from ..embedding import compose_batch
from ..errors import ConfigError, DataError, ImageLoadError, explain
from ..metrics import topk_rows

__all__ = ["GallerySearcher", "decode_image_bytes", "UPLOAD_FORMATS", "DEFAULT_UPLOAD_PIXELS", "MIME_TYPES"]

#: the PIL decoders an uploaded image may reach (the formats browsers show); nothing else is tried
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: the content type a file is served with, by the format read from its header
MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
#: pixel limit of an uploaded image (a 24-megapixel photo), below the gallery's data.images.DEFAULT_MAX_PIXELS:
#: a few kB of PNG can ask for hundreds of MB when decoded
DEFAULT_UPLOAD_PIXELS = 24_000_000


def decode_image_bytes(data: bytes, *, max_pixels: int | None = DEFAULT_UPLOAD_PIXELS, what: str = "the upload",
                       formats: tuple[str, ...] | None = UPLOAD_FORMATS) -> Image.Image:
    """Decode ``data`` into an RGB PIL image; ImageLoadError (naming ``what``) for anything that is not a
    readable image in ``formats`` or has more than ``max_pixels`` pixels (decompression-bomb guard)."""
    if not data:
        raise ImageLoadError(explain(f"{what} is empty", got="0 bytes", fix="choose an image file"))
    return decode_image(io.BytesIO(data), what=what, max_pixels=max_pixels, formats=formats,
                        fix="choose an image file (PNG, JPEG, WebP, GIF or BMP)", limit_fix="upload a smaller image")


class GallerySearcher:
    """Top-k composed search over ``bank`` for images shown from ``images``.

    Args:
        model: meets the CIRModel protocol; the target side that made ``bank`` (checked by fingerprint
            only when the caller runs ``bank.check_compatible``).
        bank: a single- or multi-vector NegativeBank.
        images: an ImageStore over (at least part of) the bank's ids: the gallery shown, and the
            reference images picked by id. Its transform preprocesses uploads too.
        index: optional FaissIndex exported from this very bank (``index.check_bank``: same checksum
            and id -> row map), searched instead of the exact scan.
        device: where the model runs (default: where its parameters are).
        max_pixels: pixel limit for uploaded and path-given images (default :data:`DEFAULT_UPLOAD_PIXELS`,
            lower than the gallery's own limit).

    Thread-safe: decoding and preprocessing run in the caller's thread, the model one query at a time.
    """

    def __init__(self, model: Any, bank: Any, images: ImageStore, *, index: Any = None, device: Any = None,
                 max_pixels: int | None = DEFAULT_UPLOAD_PIXELS) -> None:
        if not isinstance(images, ImageStore):
            raise ConfigError(explain("images must be an ImageStore (the gallery's files are served from it)",
                                      got=type(images).__name__, fix="pass split.images of a loaded split"))
        check_positive_int("max_pixels", max_pixels, allow_none=True)
        self.model, self.bank, self.images, self.index, self.max_pixels = model, bank, images, index, max_pixels
        self.device = torch.device(device) if device is not None else model_device(model)
        self.gallery_ids = [i for i in bank.ids if i in images]
        if not self.gallery_ids:
            raise DataError(explain("no bank id is in the image store: the bank was built over another split",
                                    got=f"bank ids like {bank.ids[:3]}, store ids like {images.ids[:3]}",
                                    fix="serve the split the bank was built from (--split), or build a bank over "
                                        "this split: cir-plugins build-bank ... --split SPLIT"))
        self._gallery = set(self.gallery_ids)
        self._shown: list[list[str]] = [[] for _ in range(len(bank))]
        for image_id in self.gallery_ids:
            self._shown[bank.row_of(image_id)].append(image_id)
        if index is not None:
            index.check_bank(bank)
        self._lock = threading.Lock()  # one query at a time through the model (eval-mode switching is not reentrant)

    @property
    def index_name(self) -> str:
        """"exact" or the FAISS index's description."""
        return "exact" if self.index is None else repr(self.index)

    def has_image(self, image_id: str) -> bool:
        return image_id in self._gallery

    def image_file(self, image_id: str) -> tuple[bytes, str]:
        """The file of a gallery id to serve: (bytes, content type of the format in its header); a format browsers
        do not show is decoded (pixel-limited) and sent as PNG."""
        if image_id not in self._gallery:
            raise DataError(explain("unknown gallery image id", got=image_id, fix="pick an id from the gallery list"))
        data, kind = self.images.read_file(image_id)
        if kind in MIME_TYPES:
            return data, MIME_TYPES[kind]
        out = io.BytesIO()
        self.images.load_pil(image_id).save(out, "PNG")
        return out.getvalue(), MIME_TYPES["PNG"]

    def open_relative(self, relative: str) -> Image.Image:
        """An image file by a path relative to the store's root (UnsafePathError if it leaves it), pixel-limited."""
        return self.images.load_relative(relative, what=f"reference_path {relative!r}", max_pixels=self.max_pixels)

    def _pixels(self, image_id: str | None, image: Image.Image | None) -> torch.Tensor:
        """The preprocessed reference (C, H, W) of a gallery id or a PIL image."""
        if (image_id is None) == (image is None):
            raise ConfigError(explain("give exactly one reference: a gallery image id or an image",
                                      got=f"image_id={image_id!r}, image={'given' if image is not None else None}"))
        if image_id is not None:
            if image_id not in self._gallery:
                raise DataError(explain("unknown gallery image id", got=image_id, fix="pick an id from the gallery"))
            return self.images[image_id]  # (C, H, W)
        return self.images.transform(to_rgb(image))  # (C, H, W)

    def _compose(self, text: str, pixels: torch.Tensor) -> torch.Tensor:
        if not isinstance(text, str) or not text.strip():
            raise DataError(explain("the modification text is empty", got=text, fix="type what should change"))
        with eval_mode(self.model), torch.no_grad():
            query = compose_batch(self.model, pixels[None].to(self.device), [text])  # (1, D)
        return F.normalize(query.float(), dim=-1)

    def compose(self, text: str, *, image_id: str | None = None, image: Image.Image | None = None) -> torch.Tensor:
        """The normalised composed query (1, D) for a gallery id or a PIL image, and ``text``."""
        pixels = self._pixels(image_id, image)
        with self._lock:
            return self._compose(text, pixels)

    def search(self, text: str, *, image_id: str | None = None, image: Image.Image | None = None, k: int = 10,
               exclude_reference: bool = True) -> dict:
        """Top-k gallery images for the query, best first.

        Returns ``{"index": ..., "results": [{"rank", "id", "ids", "score"}]}``: ``id`` is the first
        servable id of the bank row, ``ids`` every servable id of that row. The reference's own row is
        left out when ``exclude_reference`` and the reference is a gallery id.
        """
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(self.bank):
            raise ConfigError(explain("k must be a positive int no larger than the bank", got=k,
                                      expected=f"1..{len(self.bank)}"))
        pixels = self._pixels(image_id, image)  # decoding and preprocessing outside the model's lock
        with self._lock:
            query = self._compose(text, pixels)
            keep_reference = not exclude_reference or image_id is None
            exclude = None if keep_reference else torch.tensor([[self.bank.row_of(image_id)]], dtype=torch.long)
            if self.index is not None:
                scores, rows = self.index.search(query, k, exclude_rows=exclude)
            else:
                bank = self.bank.embeddings
                q = query.to(bank.device, bank.dtype)
                scores, rows = topk_rows(q, bank, k, similarity=self.bank.similarity,
                                         exclude_rows=None if exclude is None else exclude.to(bank.device))
        results = []
        for rank, (row, score) in enumerate(zip(rows[0].tolist(), scores[0].tolist()), start=1):
            if row < 0 or not self._shown[row]:
                continue  # nothing left to show (excluded, or a row whose images are outside the store)
            results.append({"rank": rank, "id": self._shown[row][0], "ids": list(self._shown[row]),
                            "score": float(score)})
        return {"index": self.index_name, "results": results}
