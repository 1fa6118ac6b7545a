"""Pair each image with a moderately dissimilar partner drawn from a rank window.

For every query image, all *candidate* images (every other image, minus the query's exact duplicates, and,
with ``groups``, minus images of another group) are ranked by cosine similarity to the query, best first (rank
0 is the most similar). Partners are drawn uniformly, without replacement, from the ranks ``[a, b)``.

Streams, for N up to 1e6: ``chunk_size`` query rows at a time, one ``(chunk, N)`` score block each, never the
N x N matrix nor a top-b of width ~N. Per row the scores at rank a and rank b - 1 (two selections) bound the
window; a row with more than b - a scores between them (equal scores at a boundary) is resolved by the tie
rule; only the b - a members are hashed. CPU float32/float64: numpy's introselect per row over
``torch.get_num_threads()`` threads; any other device or dtype: ``torch.kthvalue`` and a masked ``topk`` per
block. Both are exact and draw the same (benchmarks/RESULTS.md: N = 200k on 2 CPU threads, 1e6 on a GPU).

Tie rule: candidates with equal cosine are ordered by their position in the input (earlier first).

Draw rule: query q's partners are the ``partners_per_image`` window members j with the smallest key
``splitmix64(seed * 2**40 + q * N + j)`` (bijective, so keys never tie): a uniform draw without replacement
that depends only on ``seed``, the query's row, the candidates' rows and the window, never on ``chunk_size``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np
import torch

from .._console import progress_bar
from ..checks import check_positive_ints
from ..embedding import embed_images
from ..errors import ConfigError, DataError, NonFiniteError, ShapeError, explain

__all__ = ["RankWindow", "parse_rank_window", "select_partners", "pair_embeddings", "pair_images", "PairingResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankWindow:
    """A rank window ``[start, stop)``: both ints (absolute ranks) or both floats in ``[0, 1]`` (fractions of the
    query's candidate count M: ``floor(start * M)``, ``floor(stop * M)``, holding at least the rank it starts
    at, so "the nearest 1%" of fewer than 100 candidates is the nearest one). A negative ``start`` means "any
    candidate" (``stop`` is then ignored)."""

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
            b = max(b, a + 1)  # a window narrower than one rank keeps its first rank
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
            expected = "'a,b' with ints (ranks) or floats in [0,1] (fractions), or '-1' for any"
            raise ConfigError(explain("cannot parse the rank window", got=window, expected=expected,
                                      fix="write e.g. '10000,15000' or '0.2,0.3'"))
        window = tuple(values) if len(values) == 2 else (values[0], values[0])
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ConfigError(explain("rank_window must be a pair (a, b)", got=window,
                                  expected="(int, int) ranks or (float, float) fractions of N",
                                  fix="pass e.g. (10000, 15000) or (0.2, 0.3); a < 0 means any image"))
    a, b = window
    if any(isinstance(value, bool) or not isinstance(value, (int, float)) for value in (a, b)):
        raise ConfigError(explain("rank_window bounds must be numbers", got=window, fix="pass two ints or two floats"))
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


# False sends CPU blocks through the torch path too (the tests compare both paths)
_NUMPY_ON_CPU = True
_MASK64 = (1 << 64) - 1
_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB, None)


def _key_offset(seed: int, q: int, n: int) -> int:
    """The draw key of candidate j for query q is ``splitmix64(offset + j)`` (mod 2**64); this is the offset."""
    return (int(seed) * (1 << 40) + 0x9E3779B97F4A7C15 + q * n) & _MASK64


def _splitmix(z: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """splitmix64's mixer as signed int64: ``z`` uint64 numpy (changed in place) or int64 torch (any device)."""
    if isinstance(z, np.ndarray):
        with np.errstate(over="ignore"):
            for shift, mult in zip((30, 27, 31), _MULTIPLIERS):
                z ^= z >> np.uint64(shift)
                if mult:
                    z *= np.uint64(mult)
        return z.view(np.int64)
    for shift, mult in zip((30, 27, 31), _MULTIPLIERS):  # int64 wraps like uint64; >> is arithmetic, so mask
        z = z ^ ((z >> shift) & ((1 << (64 - shift)) - 1))
        if mult:
            z = z * (mult - (1 << 64))
    return z


def _tie_window(block: torch.Tensor, a: int, b: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Exact window mask (r, N) of score rows ``block`` (r, N) whose rank-a score is hi (r,), rank-(b-1) lo (r,):
    a score equal to either has rank ``#greater + (its position among the equal ones)``, a member in [a, b)."""
    lo, hi = lo[:, None], hi[:, None]
    inside = (block > lo) & (block < hi)
    for v in (lo, hi):
        equal = block == v
        rank = (block > v).sum(1, keepdim=True) + torch.cumsum(equal, 1) - 1  # (r, N), valid where equal
        inside |= equal & (rank >= a) & (rank < b)
    return inside


def _row_partners(s: np.ndarray, a: int, b: int, offset: int, k: int) -> list[int]:
    """The draw of one query row: scores s (N,) (-inf where excluded), window [a, b) with b <= candidates. Rank t
    sits at ascending position N - 1 - t; two introselects, the first at the boundary with the narrower side."""
    n = s.size
    if a >= b:
        return []
    if b - 1 <= n - 1 - a:  # rank b-1 first; above it ranks 0 .. b-2, rank t at ascending position b-2-t
        p = np.partition(s, n - b)
        lo = hi = p[n - b]
        if a < b - 1:
            above = p[n - b + 1:]
            above.partition(b - 2 - a)
            hi = above[b - 2 - a]
    else:  # rank a first; below it ranks a+1 .. N-1, rank t at ascending position N-1-t
        p = np.partition(s, n - 1 - a)
        lo = hi = p[n - 1 - a]
        if a < b - 1:
            below = p[:n - 1 - a]
            below.partition(n - b)
            lo = below[n - b]
    members = np.flatnonzero((s >= lo) & (s <= hi))
    if members.size != b - a:  # equal scores at a boundary: the tie rule decides which belong
        x = torch.from_numpy(s)[None]
        members = torch.nonzero(_tie_window(x, a, b, x.new_tensor([lo]), x.new_tensor([hi]))[0]).squeeze(1).numpy()
    keys = _splitmix(members.astype(np.uint64) + np.uint64(offset))
    if k == 1:
        return [int(members[keys.argmin()])]
    take = np.argpartition(keys, k - 1)[:k] if keys.size > k else np.arange(keys.size)
    return members[take[np.argsort(keys[take])]].tolist()


def _block_partners(block: torch.Tensor, a: int, b: int, offsets: torch.Tensor, k: int) -> list[list[int]]:
    """The draws of score rows ``block`` (r, N) sharing the window [a, b), on block's device; offsets (r,) int64."""
    n = block.shape[1]
    hi = torch.kthvalue(block, n - a, dim=1).values  # (r,) score at rank a
    lo = torch.kthvalue(block, n - b + 1, dim=1).values  # (r,) score at rank b - 1
    inside = (block >= lo[:, None]) & (block <= hi[:, None])  # (r, N)
    tied = torch.nonzero(inside.sum(1) != b - a).squeeze(1)
    if tied.numel():
        inside[tied] = _tie_window(block[tied], a, b, lo[tied], hi[tied])
    keys = _splitmix(offsets[:, None] + torch.arange(n, device=block.device))  # (r, N) int64
    keys.masked_fill_(~inside, torch.iinfo(torch.int64).max)
    return torch.topk(keys, min(k, b - a), dim=1, largest=False, sorted=True).indices.tolist()


def select_partners(embeddings: torch.Tensor, *, rank_window: Any, partners_per_image: int = 1, seed: int = 0,
                    groups: Sequence[Any] | None = None, duplicates: Sequence[Any] | None = None,
                    query_rows: Sequence[int] | None = None, chunk_size: int = 256, normalize: bool = True,
                    show_progress: bool = False) -> list[list[int]]:
    """Draw partners for each query row from its rank window (streaming: see the module docstring).

    Args:
        embeddings: (N, D) float; rows are L2-normalised here unless ``normalize=False``.
        rank_window: see :func:`parse_rank_window`.
        partners_per_image: drawn per query without replacement (a smaller window gives all its members).
        groups: optional per-row labels (length N); candidates share the query's label, ranks (and fractions)
            count within the group.
        duplicates: optional per-row duplicate-group ids (length N); rows sharing the query's are excluded (the
            query itself always is).
        query_rows: rows that get partners (default: all N), in the order returned.
        chunk_size: query rows per (chunk, N) score block.

    Returns one list of partner row indices per query row, in draw order (empty for an empty window).
    """
    window = parse_rank_window(rank_window)
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ShapeError(explain("pairing embeddings must be a 2-D floating-point tensor (N, D)",
                                 got=getattr(embeddings, "shape", type(embeddings).__name__)))
    check_positive_ints(partners_per_image=partners_per_image, chunk_size=chunk_size)
    if not bool(torch.isfinite(embeddings).all()):
        raise NonFiniteError(explain("pairing embeddings contain NaN or infinity",
                                     fix="check the pair encoder's output"))
    n, device, k = embeddings.shape[0], embeddings.device, partners_per_image
    emb = torch.nn.functional.normalize(embeddings, dim=1) if normalize else embeddings
    emb_t = emb.t().contiguous()  # (D, N): contiguous for the chunk matmuls
    group = _codes(groups, n, "groups") if groups is not None else None
    dup = _codes(duplicates, n, "duplicates") if duplicates is not None else None
    rows_all = torch.arange(n) if query_rows is None else torch.as_tensor(list(query_rows), dtype=torch.int64)
    if rows_all.numel() and (int(rows_all.min()) < 0 or int(rows_all.max()) >= n):
        raise ConfigError(explain("query_rows out of range", got=(int(rows_all.min()), int(rows_all.max())),
                                  expected=f"0 <= row < {n}"))
    # candidates per row: same group, not the row's duplicate group (itself included)
    g_list = group.tolist() if group is not None else [0] * n
    d_list = dup.tolist() if dup is not None else list(range(n))
    g_size, gd_size = Counter(g_list), Counter(zip(g_list, d_list))
    group, dup = (None if t is None else t.to(device) for t in (group, dup))
    numpy_rows = _NUMPY_ON_CPU and device.type == "cpu" and emb.dtype in (torch.float32, torch.float64)
    result: list[list[int]] = []
    bar = progress_bar(total=rows_all.numel(), desc="pairing: rank windows", unit="img", show_progress=show_progress)
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        for start in range(0, rows_all.numel(), chunk_size):
            rows = rows_all[start:start + chunk_size].to(device)  # (c,)
            c, row_list = rows.numel(), rows.tolist()
            scores = emb[rows] @ emb_t  # (c, D) @ (D, N) -> (c, N) cosine scores
            scores[torch.arange(c, device=device), rows] = float("-inf")  # never the query itself
            if group is not None:
                scores.masked_fill_(group[rows][:, None] != group[None, :], float("-inf"))
            if dup is not None:
                scores.masked_fill_(dup[rows][:, None] == dup[None, :], float("-inf"))
            bounds = [window.resolve(g_size[g_list[r]] - gd_size[(g_list[r], d_list[r])]) for r in row_list]
            offsets = [_key_offset(seed, r, n) for r in row_list]
            if numpy_rows:
                picks = list(pool.map(_row_partners, scores.detach().numpy(), *zip(*bounds), offsets, repeat(k)))
            else:
                picks = [[] for _ in range(c)]
                for (a, b) in set(bounds):
                    if a < b:
                        local = [i for i in range(c) if bounds[i] == (a, b)]
                        signed = torch.tensor([o - (1 << 64) if o >> 63 else o for o in (offsets[i] for i in local)],
                                              dtype=torch.int64, device=device)
                        for i, p in zip(local, _block_partners(scores[local], a, b, signed, k)):
                            picks[i] = p
            result.extend(picks)
            bar.update(c)
    bar.close()
    if empty := sum(1 for r in result if not r):
        logger.info("pairing: %d of %d query images have an empty rank window", empty, len(result))
    return result


def pair_embeddings(encoder: Callable[[torch.Tensor], torch.Tensor], image_ids: Sequence[str], images: Mapping, *,
                    batch_size: int = 64, show_progress: bool = False) -> torch.Tensor:
    """(N, D) float32 CPU pair embeddings through the package's one embedding loop (tokens mean-pooled)."""
    return embed_images(encoder, image_ids, images, batch_size=batch_size, output_device="cpu", pool_tokens=True,
                        show_progress=show_progress, desc="pairing: embedding images").float()


@dataclass
class PairingResult:
    """Partners per query id, and what the pairing saw."""

    partners: dict[str, list[str]]
    windows_empty: int = 0
    info: dict = field(default_factory=dict)


def pair_images(encoder: Callable[[torch.Tensor], torch.Tensor], image_ids: Sequence[str],
                images: Mapping[str, torch.Tensor], *, rank_window: Any, partners_per_image: int = 1, seed: int = 0,
                groups: Mapping[str, Any] | None = None, duplicates: Mapping[str, str] | None = None,
                query_ids: Sequence[str] | None = None, batch_size: int = 64, chunk_size: int = 512,
                show_progress: bool = False) -> PairingResult:
    """Embed ``image_ids`` and draw partners for ``query_ids`` (default all) among them: ``groups`` id -> label
    constraint (e.g. FashionIQ category); ``duplicates`` id -> duplicate group id (from
    :func:`cir_plugins.data.dedup.find_duplicates`), excluded as partners."""
    ids = list(image_ids)
    if len(set(ids)) != len(ids):
        raise DataError(explain("image_ids contain repeats", fix="pass each id once"))
    row_of = {i: r for r, i in enumerate(ids)}
    query = ids if query_ids is None else list(query_ids)
    if unknown := [i for i in query if i not in row_of]:
        raise DataError(explain("query ids are not among image_ids", got=unknown[:5]))
    for name, mapping in (("groups", groups), ("duplicates", duplicates)):
        if mapping is not None and (lacking := [i for i in ids if i not in mapping]):
            raise DataError(explain(f"{name} has no entry for some image ids", got=lacking[:5],
                                    fix=f"give every image id a {name} label"))
    embeddings = pair_embeddings(encoder, ids, images, batch_size=batch_size, show_progress=show_progress)  # (N, D)
    picks = select_partners(
        embeddings, rank_window=rank_window, partners_per_image=partners_per_image, seed=seed,
        groups=[groups[i] for i in ids] if groups is not None else None,
        duplicates=[duplicates[i] for i in ids] if duplicates is not None else None,
        query_rows=[row_of[i] for i in query], chunk_size=chunk_size, show_progress=show_progress)
    return PairingResult(partners={qid: [ids[p] for p in row] for qid, row in zip(query, picks)},
                         windows_empty=sum(1 for r in picks if not r), info={"images": len(ids), "queries": len(query)})
