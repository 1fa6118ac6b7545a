"""Composed search over a saved bank, without any web framework: :class:`GallerySearcher`.

A query is a reference image (a gallery id, or an uploaded image) plus a modification text; the
model composes it (the evaluation's own composition, :func:`cir_plugins.evaluation._compose_all`),
the query is L2-normalised and the bank is searched exactly (:func:`cir_plugins.metrics.topk_rows`)
or through a FAISS index exported from the same bank
(:class:`cir_plugins.negatives.faiss_index.FaissIndex`). Results name every image id of a bank row
that the image store can show (duplicates share a row).
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .._utils import eval_mode, model_device
from ..data.images import DEFAULT_MAX_PIXELS, ImageStore, decode_image, resolve_under_root, to_rgb
from ..data.triplet import Triplet
from ..errors import BankMismatchError, ConfigError, DataError, ImageLoadError, explain

__all__ = ["GallerySearcher", "decode_image_bytes"]

logger = logging.getLogger(__name__)

_QUERY_ID = "__query_image__"


def decode_image_bytes(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, what: str = "the upload") -> Image.Image:
    """Decode ``data`` into an RGB PIL image; ImageLoadError (naming ``what``) for anything that is not a
    readable image or has more than ``max_pixels`` pixels (decompression-bomb guard, as ImageStore)."""
    if not data:
        raise ImageLoadError(explain(f"{what} is empty", got="0 bytes", fix="choose an image file"))
    return decode_image(io.BytesIO(data), what=what, max_pixels=max_pixels,
                        fix="choose an image file (PNG, JPEG, WebP, GIF or BMP)", limit_fix="upload a smaller image")


class GallerySearcher:
    """Top-k composed search over ``bank`` for images shown from ``images``.

    Args:
        model: meets the CIRModel protocol; the target side that made ``bank`` (checked by fingerprint
            only when the caller runs ``bank.check_compatible``).
        bank: a single- or multi-vector NegativeBank.
        images: an ImageStore over (at least part of) the bank's ids: the gallery shown, and the
            reference images picked by id. Its transform preprocesses uploads too.
        index: optional FaissIndex exported from this bank (same fingerprint and rows), searched
            instead of the exact scan.
        device: where the model runs (default: where its parameters are).
        max_pixels: pixel limit for uploaded and path-given images.
    """

    def __init__(self, model: Any, bank: Any, images: ImageStore, *, index: Any = None, device: Any = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        if not isinstance(images, ImageStore):
            raise ConfigError(explain("images must be an ImageStore (the gallery's files are served from it)",
                                      got=type(images).__name__, fix="pass split.images of a loaded split"))
        self.model, self.bank, self.images, self.index = model, bank, images, index
        self.device = torch.device(device) if device is not None else model_device(model)
        self.max_pixels = max_pixels
        self.gallery_ids = [i for i in bank.ids if i in images]
        if not self.gallery_ids:
            raise DataError(explain("no bank id is in the image store", got=f"bank ids like {bank.ids[:3]}, store ids "
                                    f"like {images.ids[:3]}", fix="serve the split the bank was built from"))
        self._gallery = set(self.gallery_ids)
        self._shown: list[list[str]] = [[] for _ in range(len(bank))]
        for image_id in self.gallery_ids:
            self._shown[bank.row_of(image_id)].append(image_id)
        if index is not None:
            if index.fingerprint != bank.fingerprint or len(index) != len(bank):
                raise BankMismatchError(explain("the FAISS index was not exported from this bank",
                                                got=f"index fingerprint {index.fingerprint!r}, {len(index)} rows",
                                                expected=f"{bank.fingerprint!r}, {len(bank)} rows",
                                                fix="export the index again from this bank"))
        self._lock = threading.Lock()  # one query at a time through the model (eval-mode switching is not reentrant)

    @property
    def index_name(self) -> str:
        """"exact" or the FAISS index's description."""
        return "exact" if self.index is None else repr(self.index)

    def has_image(self, image_id: str) -> bool:
        return image_id in self._gallery

    def path_of(self, image_id: str):
        """The file of a gallery id (resolved under the store's root); DataError for other ids."""
        if image_id not in self._gallery:
            raise DataError(explain("unknown gallery image id", got=image_id, fix="pick an id from the gallery list"))
        return self.images.path_of(image_id)

    def open_relative(self, relative: str) -> Image.Image:
        """An image file given by a path relative to the store's root (UnsafePathError if it leaves the root)."""
        path = resolve_under_root(self.images.root, relative, what="reference_path")
        if not path.is_file():
            raise ImageLoadError(explain("reference_path names no file", got=relative,
                                         fix=f"give a path relative to the image root {str(self.images.root)!r}"))
        return decode_image_bytes(path.read_bytes(), max_pixels=self.max_pixels, what=f"reference_path {relative!r}")

    def compose(self, text: str, *, image_id: str | None = None, image: Image.Image | None = None) -> torch.Tensor:
        """The normalised composed query (1, D) for a gallery id or a PIL image, and ``text``."""
        if (image_id is None) == (image is None):
            raise ConfigError(explain("give exactly one reference: a gallery image id or an image",
                                      got=f"image_id={image_id!r}, image={'given' if image is not None else None}"))
        if image_id is not None:
            if image_id not in self._gallery:
                raise DataError(explain("unknown gallery image id", got=image_id, fix="pick an id from the gallery"))
            pixels = self.images[image_id]  # (C, H, W)
        else:
            pixels = self.images.transform(to_rgb(image))  # (C, H, W)
        triplet = Triplet(_QUERY_ID, (text,), None)  # DataError for an empty text
        from ..evaluation import _compose_all

        with eval_mode(self.model), torch.no_grad():
            query = _compose_all(self.model, {_QUERY_ID: pixels}, [triplet], 1, self.device, False)  # (1, D)
        return F.normalize(query.float(), dim=-1)

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
        with self._lock:
            query = self.compose(text, image_id=image_id, image=image)
            exclude = None
            if exclude_reference and image_id is not None:
                exclude = torch.tensor([[self.bank.row_of(image_id)]], dtype=torch.long)
            if self.index is not None:
                scores, rows = self.index.search(query, k, exclude_rows=exclude)
            else:
                from ..metrics import topk_rows

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
