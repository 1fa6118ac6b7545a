"""Group duplicate images: every image id maps to a group id, the first id of its group in input order.

Exact duplicates are images whose *decoded* pixels are identical (the file bytes may differ: another encoder,
metadata, a re-save), found in one pass by :func:`pixel_hash`. Optional near-duplicates: rows whose embedding cosine
is at least ``near_duplicate_threshold`` are merged (union-find), ``chunk_size`` rows at a time (the N x N matrix is
never held).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._console import progress_bar
from ..errors import ConfigError, DataError, ShapeError, explain
from .images import pil_loader

__all__ = ["pixel_hash", "find_duplicates", "near_duplicate_groups", "group_rows"]

logger = logging.getLogger(__name__)


def pixel_hash(image: Any) -> str:
    """blake2b hex digest of a PIL image's decoded RGB pixels (mode, size and bytes).

    A tensor (an image already decoded and preprocessed, as in a plain ``{id: tensor}`` mapping) is
    hashed by its dtype, shape and exact values: equal tensors, and only those, share a digest.
    """
    digest = hashlib.blake2b(digest_size=20)
    if isinstance(image, torch.Tensor):
        flat = image.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"tensor:{flat.dtype}:{tuple(image.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())  # the raw bytes, whatever the dtype
        return digest.hexdigest()
    rgb = image.convert("RGB") if getattr(image, "mode", None) != "RGB" else image
    digest.update(rgb.mode.encode())
    digest.update(f"{rgb.size[0]}x{rgb.size[1]}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def group_rows(image_ids: Sequence[str], groups: Mapping[str, Any] | None) -> tuple[list[str], list[int]]:
    """One row per duplicate group: (representatives, row of each id). The representative of a group is its
    first id met; ``rows[i]`` is the row of ``image_ids[i]``. Ids missing from ``groups`` are their own group
    (never merged with a group that happens to share their name)."""
    groups = groups or {}
    row_of_group: dict[Any, int] = {}
    representatives, rows = [], []
    for image_id in image_ids:
        group = groups[image_id] if image_id in groups else ("\0own", image_id)
        if group not in row_of_group:
            row_of_group[group] = len(representatives)
            representatives.append(image_id)
        rows.append(row_of_group[group])
    return representatives, rows


class _UnionFind:
    """Union-find over 0..n-1 whose root is always the smallest index of its set."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = (rx, ry) if rx < ry else (ry, rx)
            self.parent[hi] = lo


def near_duplicate_groups(embeddings: torch.Tensor, threshold: float, *, start_groups: Sequence[int] | None = None,
                          chunk_size: int = 1024, show_progress: bool = False) -> list[int]:
    """Row -> representative row (the smallest row of its group) by cosine >= ``threshold``.

    Args:
        embeddings: (N, D) float, L2-normalised here.
        threshold: cosine in (-1, 1]; pairs at or above it are merged (transitively).
        start_groups: optional row -> representative row of groups already known (exact duplicates).
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ShapeError(explain("near-duplicate embeddings must be (N, D)",
                                 got=getattr(embeddings, "shape", type(embeddings).__name__)))
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 < threshold <= 1.0:
        raise ConfigError(explain("near_duplicate_threshold must be a cosine in (-1, 1]", got=threshold,
                                  fix="pass e.g. 0.98, or None to merge only exact duplicates"))
    n = embeddings.shape[0]
    uf = _UnionFind(n)
    if start_groups is not None:
        for row, rep in enumerate(start_groups):
            uf.union(row, rep)
    emb = torch.nn.functional.normalize(embeddings.float(), dim=1)
    emb_t = emb.t().contiguous()  # (D, N)
    for start in progress_bar(range(0, n, chunk_size), desc="dedup: near duplicates", show_progress=show_progress):
        block = emb[start:start + chunk_size] @ emb_t  # (c, D) @ (D, N) -> (c, N) cosines
        rows, cols = torch.nonzero(block >= threshold, as_tuple=True)
        for r, c in zip((rows + start).tolist(), cols.tolist()):
            if c > r:  # each unordered pair once; the diagonal is skipped
                uf.union(r, c)
    return [uf.find(i) for i in range(n)]


def find_duplicates(image_ids: Sequence[str], images: Any, *, embeddings: torch.Tensor | None = None,
                    near_duplicate_threshold: float | None = None, chunk_size: int = 1024,
                    show_progress: bool = True) -> dict[str, str]:
    """Map every id to its duplicate-group id (the first id of its group in input order).

    Args:
        image_ids: ids, unique.
        images: an ImageStore (its ``load_pil`` is used), a Mapping id -> PIL.Image or id -> image
            tensor (hashed by exact values, see :func:`pixel_hash`), or a callable id -> PIL.Image.
        embeddings: (N, D) rows aligned with ``image_ids``; needed only for near duplicates.
        near_duplicate_threshold: None (exact duplicates only) or a cosine; pairs at or above it
            also merge.
    """
    ids = list(image_ids)
    if len(set(ids)) != len(ids):
        repeats = [i for i, n in Counter(ids).items() if n > 1]
        raise DataError(explain("image_ids contain repeats", got=repeats[:5], fix="pass each id once"))
    load = pil_loader(images, convert_tensors=False)  # tensors are hashed by their exact values
    first_of_hash: dict[str, int] = {}
    rep = [first_of_hash.setdefault(pixel_hash(load(image_id)), row) for row, image_id in
           enumerate(progress_bar(ids, desc="dedup: hashing pixels", show_progress=show_progress))]
    if near_duplicate_threshold is not None:
        if embeddings is None:
            raise ConfigError(explain("near_duplicate_threshold needs embeddings",
                                      fix="pass embeddings (N, D) aligned with image_ids, or drop the threshold"))
        if embeddings.dim() != 2 or embeddings.shape[0] != len(ids):
            raise ShapeError(explain("embeddings must be (N, D) with N = len(image_ids)",
                                     got=tuple(embeddings.shape), expected=f"({len(ids)}, D)"))
        rep = near_duplicate_groups(embeddings, near_duplicate_threshold, start_groups=rep,
                                    chunk_size=chunk_size, show_progress=show_progress)
    if merged := len(ids) - len(set(rep)):
        logger.info("dedup: %d images fall into %d groups (%d merged)", len(ids), len(set(rep)), merged)
    return {image_id: ids[r] for image_id, r in zip(ids, rep)}
