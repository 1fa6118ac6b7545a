"""Pair each image with a moderately dissimilar partner drawn from a rank window.

For every query image, all *candidate* images (every other image, minus the query's exact
duplicates, and, with ``groups``, minus images of another group) are ranked by cosine similarity
to the query, best first. Rank 0 is the most similar candidate. Partners are drawn uniformly,
without replacement, from the ranks ``[a, b)`` of that ranking.

Never materialises the N x N similarity matrix: query rows are processed ``chunk_size`` at a
time; each chunk holds one ``(chunk, N)`` score block. On CPU, ``np.argpartition`` selects the
top ``b`` of each row and a second introselect over those the ranks ``[a, b)``; rows whose boundary
scores are tied (where the tie rule matters) and non-CPU blocks take the exact ``torch.topk`` path,
which also uses an exact (chunk, N) mask for ties straddling a boundary. Both give the same draw.

Tie rule: candidates with equal cosine are ordered by their position in the input (earlier
first).

Draw rule: query q's partners are the ``partners_per_image`` window members j with the smallest
key ``splitmix64(seed * 2**40 + q * N + j)`` (a bijective hash, so keys never tie). This is a
uniform draw without replacement that depends only on ``seed``, the query's row, the candidates'
rows and the window, never on ``chunk_size`` or on topk's internal order.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    """A rank window ``[start, stop)``.

    ``start``/``stop`` are both ints (absolute ranks) or both floats in ``[0, 1]`` (fractions of the
    query's candidate count M, resolved as ``floor(start * M)``, ``floor(stop * M)``; a fractional window
    always holds at least the rank it starts at, so "the nearest 1%" of fewer than 100 candidates is the
    nearest one rather than nothing). A negative
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
            raise ConfigError(explain("cannot parse the rank window", got=window,
                                      expected="'a,b' with ints (ranks) or floats in [0,1] (fractions), "
                                               "or '-1' for any",
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


_MASK64 = (1 << 64) - 1


def _key(seed: int, q: int, n: int, j: int) -> int:
    """splitmix64(seed * 2**40 + q * n + j) as a signed int64 (the draw key of candidate j for query q)."""
    z = (int(seed) * (1 << 40) + q * n + j + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >= (1 << 63) else z


def _keys(seed: int, q: torch.Tensor, n: int, js: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`_key`: queries ``q`` (r,) and candidate rows ``js`` (r, w) -> (r, w) int64."""
    base = (np.asarray(q.cpu().numpy(), dtype=np.int64).astype(np.uint64) * np.uint64(n)
            + np.uint64((int(seed) * (1 << 40) + 0x9E3779B97F4A7C15) & _MASK64))  # (r,)
    with np.errstate(over="ignore"):
        z = js.cpu().numpy().astype(np.uint64) + base[:, None]  # (r, w), wraps mod 2**64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy(z.view(np.int64)).to(js.device)


def _draw(seed: int, q: torch.Tensor, n: int, js: torch.Tensor, valid: torch.Tensor, k: int) -> list[list[int]]:
    """Per row r: the (up to) k entries of ``js[r]`` where ``valid[r]`` with the smallest keys.

    q (r,), js (r, w) candidate rows, valid (r, w) bool. Returns row lists in ascending key order.
    """
    if js.shape[1] == 0:
        return [[] for _ in range(js.shape[0])]
    keys = _keys(seed, q, n, js).masked_fill(~valid, torch.iinfo(torch.int64).max)  # (r, w)
    take = min(k, js.shape[1])
    order = torch.topk(keys, take, dim=1, largest=False, sorted=True).indices  # (r, take)
    picked = torch.gather(js, 1, order).tolist()
    counts = valid.sum(1).tolist()
    return [row[:min(take, cnt)] for row, cnt in zip(picked, counts)]


def _windows_for_block_topk(block: torch.Tensor, a: int, b: int, q: torch.Tensor, seed: int,
                            k: int) -> list[list[int]]:
    """Partners for each row of ``block`` (r, N): the draw among ranks [a, b) of that row (topk path).

    The exact general path (any device, any ties); also the fallback of :func:`_windows_for_block`.
    Fast path: top-b by ``torch.topk``; the a-th largest of those is the upper edge. Exact when no
    equal scores straddle either boundary; rows where they do use the (r, N) mask path. When every
    row holds exactly b - a members, only those are hashed for the draw (same result, less work).
    Boundary-tie counts are float 0/1 sums (a bool sum over (r, N) costs several times more).
    q (r,) are the rows' global indices (for the draw keys).
    """
    r, n = block.shape
    values, indices = torch.topk(block, b, dim=1, sorted=False)  # (r, b) each
    low = values.min(dim=1).values  # (r,) b-th largest score
    # equality counts as a float 0/1 sum: much cheaper than summing a bool tensor, exact below 2**24 terms
    count_dtype = block.dtype if n < 2**24 else torch.float64
    buf = torch.empty_like(block)  # (r, N) scratch: 1.0 where the score equals the b-th largest
    straddle = torch.eq(block, low[:, None], out=buf).sum(1, dtype=count_dtype) > 1  # (r,) b-boundary ties
    del buf
    if a > 0:
        high = torch.topk(values, a, dim=1, sorted=False).values.min(dim=1).values  # (r,) a-th largest
        equal_a = torch.empty_like(values)  # (r, b) scratch: 1.0 where the score equals the a-th largest
        straddle |= torch.eq(values, high[:, None], out=equal_a).sum(1, dtype=count_dtype) > 1
        inside = values < high[:, None]  # (r, b): ranks >= a
        if bool((inside.sum(1) == b - a).all()):
            # every row holds exactly b - a members: hash only those (row-major selection keeps rows apart)
            members = indices[inside].view(r, b - a)  # (r, b - a)
            out = _draw(seed, q, n, members, torch.ones_like(members, dtype=torch.bool), k)
        else:
            out = _draw(seed, q, n, indices, inside, k)
    else:
        out = _draw(seed, q, n, indices, torch.ones_like(values, dtype=torch.bool), k)
    if bool(straddle.any()):
        tied = torch.nonzero(straddle).squeeze(1)
        sub = block[tied]  # (t, N)
        k_b = torch.full((tied.numel(),), b, dtype=torch.int64, device=block.device)
        exact = _in_top(sub, k_b) & ~_in_top(sub, torch.full_like(k_b, a))  # (t, N): rank in [a, b)
        all_rows = torch.arange(n, device=block.device).expand(tied.numel(), n)  # (t, N)
        for t, picks in zip(tied.tolist(), _draw(seed, q[tied], n, all_rows, exact, k)):
            out[t] = picks
    return out


# the partition path below; False routes every block through _windows_for_block_topk (tests compare both)
_USE_PARTITION = True
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _row_pool(workers: int) -> ThreadPoolExecutor:
    """A shared thread pool of ``workers`` threads (numpy's partition releases the GIL)."""
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cir-pairing")
    return pool


def _argselect(values: torch.Tensor, kth: int, lo: int, hi: int, workers: int) -> torch.Tensor:
    """Columns ``lo:hi`` of ``np.argpartition(values, kth, axis=1)``, as a contiguous int64 tensor (r, hi - lo).

    values (r, w) CPU float. After the introselect, ascending position ``kth`` holds the row's
    (kth+1)-th smallest value, positions before it nothing larger, positions after it nothing
    smaller. Rows are split over ``workers`` threads (numpy releases the GIL while it partitions).
    """
    x = values.numpy()  # (r, w) view

    def part(bounds: tuple[int, int]) -> np.ndarray:
        return np.ascontiguousarray(np.argpartition(x[bounds[0]:bounds[1]], kth, axis=1)[:, lo:hi])

    r = x.shape[0]
    workers = max(1, min(workers, r // 32))  # small blocks: threads cost more than they save
    if workers == 1:
        return torch.from_numpy(part((0, r)))
    cuts = np.linspace(0, r, workers + 1).astype(int)
    return torch.from_numpy(np.concatenate(list(_row_pool(workers).map(part, zip(cuts[:-1], cuts[1:])))))


def _windows_for_block(block: torch.Tensor, a: int, b: int, q: torch.Tensor, seed: int, k: int) -> list[list[int]]:
    """Partners for each row of ``block`` (r, N): the draw among ranks [a, b) of that row.

    CPU float path: ``np.argpartition`` (one introselect for the b-th largest, a second over the
    top b for the a-th) finds the window's members; rows split across torch's thread count. Exact
    whenever the b-th largest score is unique in its row and the a-th largest unique among the top
    b (then the member set cannot depend on tie order); every other row (ties at a boundary, NaN)
    goes through :func:`_windows_for_block_topk`, as do non-CPU blocks. Same draw either way.
    q (r,) are the rows' global indices (for the draw keys).
    """
    r, n = block.shape
    if (not _USE_PARTITION or block.device.type != "cpu" or block.dtype not in (torch.float32, torch.float64)
            or r == 0):
        return _windows_for_block_topk(block, a, b, q, seed, k)
    block = block.detach().contiguous()
    workers = torch.get_num_threads()
    # ascending position N - 1 - t holds rank t: positions N - b .. N - 1 hold the top b
    top = _argselect(block, n - b, n - b, n, workers)  # (r, b) column indices; column 0 is rank b - 1
    top_values = torch.gather(block, 1, top)  # (r, b)
    low = top_values[:, :1]  # (r, 1) the b-th largest score
    # ties at the b boundary, counted as a float 0/1 sum over the row (cheaper than a bool sum)
    count_dtype = block.dtype if n < 2**24 else torch.float64
    buf = torch.empty_like(block)  # (r, N) scratch: 1.0 where the score equals the b-th largest
    inexact = torch.eq(block, low, out=buf).sum(1, dtype=count_dtype) != 1  # (r,) tie at b, or NaN
    del buf
    if a == 0:
        members = top
    else:
        # within the top b, ascending position b - 1 - a holds rank a: positions 0 .. b - a - 1 are the window
        inner = _argselect(top_values, b - a - 1, 0, b - a, workers)  # (r, b - a) positions into top
        high = torch.gather(top_values, 1, inner[:, -1:])  # (r, 1) the a-th largest score
        inexact |= torch.eq(top_values, high).to(count_dtype).sum(1) != 1  # tie at a, or NaN
        members = torch.gather(top, 1, inner)  # (r, b - a) column indices of ranks a .. b - 1
    out = _draw(seed, q, n, members, torch.ones_like(members, dtype=torch.bool), k)
    if bool(inexact.any()):
        bad = torch.nonzero(inexact).squeeze(1)
        for t, picks in zip(bad.tolist(), _windows_for_block_topk(block[bad], a, b, q[bad], seed, k)):
            out[t] = picks
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
    chunk_size: int = 256,
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
    check_positive_ints(partners_per_image=partners_per_image, chunk_size=chunk_size)
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
    # candidates per row, counted from labels (no pass over the scores): same group, not a duplicate
    group_list = group_codes.tolist() if group_codes is not None else [0] * n
    dup_list = dup_codes.tolist() if dup_codes is not None else list(range(n))
    group_size = Counter(group_list)
    same_both = Counter(zip(group_list, dup_list))
    candidate_count = [group_size[g] - same_both[(g, d)] for g, d in zip(group_list, dup_list)]
    result: list[list[int]] = []
    bar = progress_bar(total=q, desc="pairing: rank windows", unit="img", show_progress=show_progress)
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
        candidates = [candidate_count[r] for r in rows.tolist()]  # M per query row
        bounds = [window.resolve(m) for m in candidates]
        by_bounds: dict[tuple[int, int], list[int]] = {}
        for i, ab in enumerate(bounds):
            by_bounds.setdefault(ab, []).append(i)
        picks: list[list[int]] = [[] for _ in range(c)]
        for (a, b), members in by_bounds.items():
            if b <= a:
                continue  # empty window
            local = torch.tensor(members, dtype=torch.int64, device=device)
            block = scores if len(members) == c else scores[local]  # (r, N)
            for i, row_picks in zip(members, _windows_for_block(block, a, b, rows[local], seed, partners_per_image)):
                picks[i] = row_picks
        del scores
        result.extend(picks)
        bar.update(c)
    bar.close()
    empty = sum(1 for r in result if not r)
    if empty:
        logger.info("pairing: %d of %d query images have an empty rank window", empty, q)
    return result


def pair_embeddings(encoder: Callable[[torch.Tensor], torch.Tensor], image_ids: Sequence[str],
                    images: Mapping[str, torch.Tensor], *, batch_size: int = 64,
                    show_progress: bool = False) -> torch.Tensor:
    """(N, D) float32 CPU pair embeddings through the package's one embedding loop (tokens mean-pooled)."""
    return embed_images(encoder, image_ids, images, batch_size=batch_size, output_device="cpu",
                        pool_tokens=True, show_progress=show_progress,
                        desc="pairing: embedding images").float()  # (N, D)


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
    group id (from :func:`cir_plugins.data.dedup.find_duplicates`), excluded as partners.
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
    embeddings = pair_embeddings(encoder, ids, images, batch_size=batch_size, show_progress=show_progress)  # (N, D)
    picks = select_partners(
        embeddings, rank_window=rank_window, partners_per_image=partners_per_image, seed=seed,
        groups=[groups[i] for i in ids] if groups is not None else None,
        duplicates=[duplicates[i] for i in ids] if duplicates is not None else None,
        query_rows=[row_of[i] for i in query], chunk_size=chunk_size, show_progress=show_progress,
    )
    partners = {qid: [ids[p] for p in row] for qid, row in zip(query, picks)}
    return PairingResult(partners=partners, windows_empty=sum(1 for r in picks if not r),
                         info={"images": len(ids), "queries": len(query)})
