"""Pair each image with a moderately dissimilar partner drawn from a rank window.

For every query image, all *candidate* images (every other image, minus the query's exact
duplicates, and, with ``groups``, minus images of another group) are ranked by cosine similarity
to the query, best first. Rank 0 is the most similar candidate. Partners are drawn uniformly,
without replacement, from the ranks ``[a, b)`` of that ranking.

Never materialises the N x N similarity matrix: query rows are processed ``chunk_size`` at a
time; each chunk holds one ``(chunk, N)`` score block, finds the two rank boundaries with
``torch.topk`` and keeps only window membership.

Tie rule: candidates with equal cosine are ordered by their position in the input (earlier
first). The draw is a function of ``seed`` and of the input order only (not of ``chunk_size``):
one ``(Q, partners_per_image)`` block of uniform numbers is drawn up front from a generator seeded
with ``seed``; query q's t-th partner is the ``floor(u[q, t] * remaining)``-th still-undrawn
window member, window members listed in input order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, ModelProtocolError, NonFiniteError, ShapeError, explain

__all__ = ["RankWindow", "parse_rank_window", "select_partners", "embed_images", "pair_images", "PairingResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankWindow:
    """A rank window ``[start, stop)``.

    ``start``/``stop`` are both ints (absolute ranks) or both floats in ``[0, 1]`` (fractions of the
    query's candidate count M, resolved as ``floor(start * M)``, ``floor(stop * M)``). A negative
    ``start`` means "any candidate" (the whole ranking; ``stop`` is then ignored).
    """

    start: int | float
    stop: int | float

    @property
    def is_any(self) -> bool:
        return self.start < 0

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.start, float) and not self.is_any

    def resolve(self, candidates: int) -> tuple[int, int]:
        """Absolute ``(a, b)`` for a query with ``candidates`` candidates, clipped to ``[0, candidates]``."""
        if self.is_any:
            return 0, candidates
        if self.is_fraction:
            a, b = math.floor(self.start * candidates), math.floor(self.stop * candidates)
        else:
            a, b = int(self.start), int(self.stop)
        return min(a, candidates), min(b, candidates)


def parse_rank_window(window: Any) -> RankWindow:
    """Validate ``window`` (a RankWindow, a pair ``(a, b)``, or a string ``"a,b"``) into a RankWindow."""
    if isinstance(window, RankWindow):
        return window
    if isinstance(window, str):
        parts = [p.strip() for p in window.replace(":", ",").split(",")]
        try:
            values = [float(p) if ("." in p or "e" in p.lower()) else int(p) for p in parts]
        except ValueError:
            values = None
        if values is None or len(values) not in (1, 2):
            raise ConfigError(explain("cannot parse the rank window", got=window,
                                      expected="'a,b' with ints (ranks) or floats in [0,1] (fractions), or '-1' for any",
                                      fix="write e.g. '10000,15000' or '0.2,0.3'"))
        window = tuple(values) if len(values) == 2 else (values[0], values[0])
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ConfigError(explain("rank_window must be a pair (a, b)", got=window,
                                  expected="(int, int) ranks or (float, float) fractions of N",
                                  fix="pass e.g. (10000, 15000) or (0.2, 0.3); a < 0 means any image"))
    a, b = window
    for value in (a, b):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(explain("rank_window bounds must be numbers", got=window,
                                      fix="pass two ints or two floats"))
    if a < 0:
        return RankWindow(-1, -1)
    if isinstance(a, int) and isinstance(b, int):
        if not a < b:
            raise ConfigError(explain("rank_window needs a < b", got=window, fix="swap or widen the bounds"))
        return RankWindow(a, b)
    if isinstance(a, float) and isinstance(b, float):
        if not (0.0 <= a < b <= 1.0):
            raise ConfigError(explain("fractional rank_window needs 0 <= a < b <= 1", got=window,
                                      fix="pass fractions of N such as (0.2, 0.3)"))
        return RankWindow(a, b)
    raise ConfigError(explain("rank_window mixes an int and a float", got=window,
                              expected="both ints (absolute ranks) or both floats (fractions of N)",
                              fix="write (10000, 15000) or (0.2, 0.3)"))


def _codes(labels: Sequence[Any], n: int, what: str) -> torch.Tensor:
    """Map a per-row label sequence (length n) to int64 codes (n,)."""
    if len(labels) != n:
        raise ShapeError(explain(f"{what} must give one label per row", got=len(labels), expected=n))
    table: dict[Any, int] = {}
    return torch.tensor([table.setdefault(label, len(table)) for label in labels], dtype=torch.int64)


def _in_top(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (c, N): entry is among the top ``k[r]`` of row r (score desc, ties by lower index).

    scores (c, N) with -inf at excluded entries; k (c,) int64 with 0 <= k[r] <= finite count of row r.
    """
    c, n = scores.shape
    out = torch.zeros(c, n, dtype=torch.bool, device=scores.device)
    kmax = int(k.max()) if c else 0
    if kmax == 0:
        return out
    rows = torch.nonzero(k > 0).squeeze(1)
    if bool((k == kmax).all()):
        # one k for the chunk: the k-th largest is the minimum of an unsorted top-k (cheaper)
        boundary = torch.topk(scores, kmax, dim=1, sorted=False).values.min(dim=1).values  # (c,)
    else:
        top = torch.topk(scores, kmax, dim=1, sorted=True).values  # (c, kmax), descending
        # the k-th largest value of each row: its boundary value
        boundary = top[rows, k[rows] - 1]  # (r,)
    sub = scores[rows]  # (r, N)
    greater = sub > boundary[:, None]
    equal = sub == boundary[:, None]
    need = k[rows] - greater.sum(1)  # how many boundary-equal entries fit, >= 1
    if bool((equal.sum(1) > need).any()):
        # ties straddle the boundary: keep the lowest-index equal entries (documented tie rule)
        order = torch.cumsum(equal, dim=1, dtype=torch.int32)  # (r, N) running count of equals
        equal &= order <= need[:, None]
    out[rows] = greater | equal
    return out


def select_partners(
    embeddings: torch.Tensor,
    *,
    rank_window: Any,
    partners_per_image: int = 1,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    duplicates: Sequence[Any] | None = None,
    query_rows: Sequence[int] | None = None,
    chunk_size: int = 512,
    normalize: bool = True,
    show_progress: bool = False,
) -> list[list[int]]:
    """Draw partners for each query row from its rank window.

    Args:
        embeddings: (N, D) float; rows are L2-normalised here unless ``normalize=False``.
        rank_window: see :func:`parse_rank_window`.
        partners_per_image: partners drawn per query, without replacement; a query whose window
            holds fewer gets the whole window.
        seed: the draw's seed.
        groups: optional per-row labels (length N); candidates must share the query's label and
            ranks (and fractions) count within the group.
        duplicates: optional per-row duplicate-group ids (length N); rows sharing the query's id
            are excluded (the query itself always is).
        query_rows: rows that get partners (default: all N), in the order returned.
        chunk_size: query rows per (chunk, N) score block.

    Returns:
        one list of partner row indices per query row (in draw order); empty if the window is empty.
    """
    window = parse_rank_window(rank_window)
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ShapeError(explain("pairing embeddings must be a 2-D tensor (N, D)",
                                 got=getattr(embeddings, "shape", type(embeddings).__name__)))
    if not embeddings.is_floating_point():
        raise ShapeError(explain("pairing embeddings must be floating point", got=embeddings.dtype))
    if isinstance(partners_per_image, bool) or not isinstance(partners_per_image, int) or partners_per_image < 1:
        raise ConfigError(explain("partners_per_image must be an int >= 1", got=partners_per_image))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(explain("chunk_size must be an int >= 1", got=chunk_size))
    if not bool(torch.isfinite(embeddings).all()):
        raise NonFiniteError(explain("pairing embeddings contain NaN or infinity",
                                     fix="check the pair encoder's output"))
    n = embeddings.shape[0]
    device = embeddings.device
    emb = torch.nn.functional.normalize(embeddings, dim=1) if normalize else embeddings
    emb_t = emb.t().contiguous()  # (D, N): contiguous for the chunk matmuls
    group_codes = _codes(groups, n, "groups").to(device) if groups is not None else None
    dup_codes = _codes(duplicates, n, "duplicates") if duplicates is not None else None
    dup_members: dict[int, torch.Tensor] = {}
    if dup_codes is not None:
        counts = torch.bincount(dup_codes)
        for code in torch.nonzero(counts > 1).squeeze(1).tolist():
            dup_members[code] = torch.nonzero(dup_codes == code).squeeze(1).to(device)
    rows_all = torch.arange(n) if query_rows is None else torch.as_tensor(list(query_rows), dtype=torch.int64)
    if rows_all.numel() and (int(rows_all.min()) < 0 or int(rows_all.max()) >= n):
        raise ConfigError(explain("query_rows out of range", got=(int(rows_all.min()), int(rows_all.max())),
                                  expected=f"0 <= row < {n}"))
    q = rows_all.numel()
    generator = torch.Generator().manual_seed(int(seed))
    # one uniform per (query, partner slot), drawn up front so chunking cannot change the draw
    uniforms = torch.rand(q, partners_per_image, generator=generator, dtype=torch.float64)
    result: list[list[int]] = []
    bar = tqdm(total=q, desc="pairing: rank windows", unit="img", disable=not show_progress)
    for start in range(0, q, chunk_size):
        rows = rows_all[start:start + chunk_size].to(device)  # (c,)
        c = rows.numel()
        scores = emb[rows] @ emb_t  # (c, D) @ (D, N) -> (c, N) cosine scores
        scores[torch.arange(c, device=device), rows] = float("-inf")  # never the query itself
        if group_codes is not None:
            scores.masked_fill_(group_codes[rows][:, None] != group_codes[None, :], float("-inf"))
        if dup_codes is not None:
            for i, r in enumerate(rows.tolist()):
                members = dup_members.get(int(dup_codes[r]))
                if members is not None:
                    scores[i, members] = float("-inf")
        candidates = torch.isfinite(scores).sum(1).tolist()  # M per query row
        bounds = [window.resolve(m) for m in candidates]
        a = torch.tensor([ab[0] for ab in bounds], dtype=torch.int64, device=device)
        b = torch.tensor([ab[1] for ab in bounds], dtype=torch.int64, device=device)
        in_window = _in_top(scores, b) & ~_in_top(scores, a)  # (c, N): rank in [a, b)
        del scores
        remaining = in_window.sum(1)  # (c,)
        picks = torch.full((c, partners_per_image), -1, dtype=torch.int64, device=device)
        u = uniforms[start:start + c].to(device)
        for t in range(partners_per_image):
            alive = remaining > 0
            if not bool(alive.any()):
                break
            # position (0-based) among the still-undrawn window members, in input order
            pos = torch.floor(u[:, t] * remaining.to(torch.float64)).to(torch.int64)
            pos = torch.minimum(pos, (remaining - 1).clamp(min=0))
            running = torch.cumsum(in_window, dim=1, dtype=torch.int32)  # (c, N)
            chosen = torch.argmax((running > pos[:, None].to(torch.int32)).to(torch.int8), dim=1)  # first index past pos
            chosen = torch.where(alive, chosen, torch.full_like(chosen, -1))
            picks[:, t] = chosen
            live = torch.nonzero(alive).squeeze(1)
            in_window[live, chosen[live]] = False
            remaining = remaining - alive.to(remaining.dtype)
        for row_picks in picks.tolist():
            result.append([p for p in row_picks if p >= 0])
        bar.update(c)
    bar.close()
    empty = sum(1 for r in result if not r)
    if empty:
        logger.info("pairing: %d of %d query images have an empty rank window", empty, q)
    return result


def embed_images(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    image_ids: Sequence[str],
    images: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 64,
    show_progress: bool = False,
) -> torch.Tensor:
    """Embed ``image_ids`` with ``encoder`` (images (n, C, H, W) -> (n, D) or (n, T, D)).

    Multi-vector outputs (n, T, D) are mean-pooled over T. Runs under ``torch.no_grad``. Returns
    (N, D) float32 on CPU, in ``image_ids`` order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(explain("batch_size must be an int >= 1", got=batch_size))
    if not callable(encoder):
        raise ModelProtocolError(explain("the pair encoder must be callable (images (n,C,H,W) -> (n,D))",
                                         got=type(encoder).__name__,
                                         fix="pass a function or a model's encode_image"))
    missing = [i for i in image_ids if i not in images]
    if missing:
        raise DataError(explain(f"{len(missing)} image ids have no image", got=missing[:5],
                                fix="pass an images mapping that covers every id"))
    out = []
    batch_fn = getattr(images, "batch", None)
    with torch.no_grad():
        for start in tqdm(range(0, len(image_ids), batch_size), desc="pairing: embedding images",
                          disable=not show_progress):
            ids = list(image_ids[start:start + batch_size])
            batch = batch_fn(ids) if callable(batch_fn) else torch.stack([images[i] for i in ids])  # (n, C, H, W)
            features = encoder(batch)
            if not isinstance(features, torch.Tensor) or features.dim() not in (2, 3) or features.shape[0] != len(ids):
                raise ModelProtocolError(explain("the pair encoder returned the wrong shape",
                                                 got=getattr(features, "shape", type(features).__name__),
                                                 expected=f"({len(ids)}, D) or ({len(ids)}, T, D)"))
            if features.dim() == 3:
                features = features.mean(dim=1)  # (n, T, D) -> (n, D): pool the tokens
            out.append(features.detach().float().cpu())
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


@dataclass
class PairingResult:
    """Partners per query id, and what the pairing saw."""

    partners: dict[str, list[str]]
    windows_empty: int = 0
    info: dict = field(default_factory=dict)


def pair_images(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    image_ids: Sequence[str],
    images: Mapping[str, torch.Tensor],
    *,
    rank_window: Any,
    partners_per_image: int = 1,
    seed: int = 0,
    groups: Mapping[str, Any] | None = None,
    duplicates: Mapping[str, str] | None = None,
    query_ids: Sequence[str] | None = None,
    batch_size: int = 64,
    chunk_size: int = 512,
    show_progress: bool = False,
) -> PairingResult:
    """Embed ``image_ids`` and draw partners for ``query_ids`` (default all) among ``image_ids``.

    ``groups``: id -> label constraint (e.g. FashionIQ category); ``duplicates``: id -> duplicate
    group id (from :func:`cir_plugins.positives.dedup.find_duplicates`), excluded as partners.
    """
    ids = list(image_ids)
    if len(set(ids)) != len(ids):
        raise DataError(explain("image_ids contain repeats", fix="pass each id once"))
    row_of = {i: r for r, i in enumerate(ids)}
    query = ids if query_ids is None else list(query_ids)
    unknown = [i for i in query if i not in row_of]
    if unknown:
        raise DataError(explain("query ids are not among image_ids", got=unknown[:5]))
    for name, mapping in (("groups", groups), ("duplicates", duplicates)):
        if mapping is not None:
            lacking = [i for i in ids if i not in mapping]
            if lacking:
                raise DataError(explain(f"{name} has no entry for some image ids", got=lacking[:5],
                                        fix=f"give every image id a {name} label"))
    embeddings = embed_images(encoder, ids, images, batch_size=batch_size, show_progress=show_progress)
    picks = select_partners(
        embeddings, rank_window=rank_window, partners_per_image=partners_per_image, seed=seed,
        groups=[groups[i] for i in ids] if groups is not None else None,
        duplicates=[duplicates[i] for i in ids] if duplicates is not None else None,
        query_rows=[row_of[i] for i in query], chunk_size=chunk_size, show_progress=show_progress,
    )
    partners = {qid: [ids[p] for p in row] for qid, row in zip(query, picks)}
    return PairingResult(partners=partners, windows_empty=sum(1 for r in picks if not r),
                         info={"images": len(ids), "queries": len(query)})
