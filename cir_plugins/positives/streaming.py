"""Rank-window partner selection that streams: the same partners as :func:`pairing.select_partners`, for N up to 1e6.

Each block of ``chunk_size`` query rows holds one (chunk, N) score block, computed exactly as
``select_partners`` computes it, so the scores are bit-identical. Per query row the window [a, b) is then
found by order statistics, not by a top-b of width ~N: the scores at rank a and rank b - 1 (two
selections) bound the window, every score between them is a member, and a row holding more than b - a
such scores (equal scores at a boundary) is resolved by the tie rule (equal scores: lower row index
first). Only the b - a members are hashed; the draw is ``select_partners``' rule, the
``partners_per_image`` members with the smallest splitmix64 keys, in ascending key order.

CPU float32/float64 input: numpy's introselect per row, rows spread over ``torch.get_num_threads()``
threads. Any other device or dtype: ``torch.kthvalue`` and a masked ``topk`` per (chunk, N) block on
the input's device. Both are exact, so both return what ``select_partners`` returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from typing import Any

import numpy as np
import torch

from .._console import progress_bar
from ..errors import ConfigError, NonFiniteError, ShapeError, explain
from .pairing import parse_rank_window

__all__ = ["select_partners_streaming"]

# False sends CPU blocks through the torch path too (the tests compare both paths)
_NUMPY_ON_CPU = True
_MASK64 = (1 << 64) - 1
_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB, None)


# TODO(owner): use pairing's public hash once exported (this is pairing._keys' splitmix64, plus a device form)
def _key_offset(seed: int, q: int, n: int) -> int:
    """The key input of candidate j for query q is ``offset + j`` (mod 2**64); this is the offset in [0, 2**64)."""
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
    """Exact window mask (r, N) of score rows ``block`` (r, N) whose rank-a score is hi (r,), rank-(b-1) lo (r,).

    Scores strictly between lo and hi are members; a score equal to either has rank
    ``#greater + (its position among the equal ones, by index)`` and is a member when that lies in [a, b).
    """
    lo, hi = lo[:, None], hi[:, None]
    inside = (block > lo) & (block < hi)
    for v in (lo, hi):
        equal = block == v
        rank = (block > v).sum(1, keepdim=True) + torch.cumsum(equal, 1) - 1  # (r, N), valid where equal
        inside |= equal & (rank >= a) & (rank < b)
    return inside


def _row_partners(s: np.ndarray, a: int, b: int, offset: int, k: int) -> list[int]:
    """The draw of one query row: scores s (N,) (-inf where excluded), window [a, b) with b <= candidates.

    Ascending position N - 1 - t of a partitioned copy holds rank t. Two single-kth introselects: the
    first at whichever boundary leaves the narrower side, the second within that side.
    """
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


def _codes(labels: Sequence[Any] | None, n: int, what: str) -> torch.Tensor | None:
    """Per-row labels (length n) as int64 codes (n,), or None."""
    if labels is None:
        return None
    if len(labels) != n:
        raise ShapeError(explain(f"{what} must give one label per row", got=len(labels), expected=n))
    table: dict[Any, int] = {}
    return torch.tensor([table.setdefault(label, len(table)) for label in labels], dtype=torch.int64)


def select_partners_streaming(
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
    """:func:`cir_plugins.positives.pairing.select_partners` without any top-b selection: the same arguments,
    the same partners.

    Args:
        embeddings: (N, D) float on any device; the scores and the selection run there.
        rank_window, partners_per_image, seed, groups, duplicates, query_rows, normalize: as ``select_partners``.
        chunk_size: query rows per (chunk, N) score block (memory: chunk * N score values, plus per-row scratch
            of about 16 N bytes per thread on CPU, or about 40 bytes per block entry on other devices).

    Returns:
        one list of partner row indices per query row, in draw order; identical to ``select_partners``'.
    """
    window = parse_rank_window(rank_window)
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ShapeError(explain("pairing embeddings must be a 2-D floating-point tensor (N, D)",
                                 got=getattr(embeddings, "shape", type(embeddings).__name__)))
    for name, value in (("partners_per_image", partners_per_image), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(explain(f"{name} must be an int >= 1", got=value))
    if not bool(torch.isfinite(embeddings).all()):
        raise NonFiniteError(explain("pairing embeddings contain NaN or infinity",
                                     fix="check the pair encoder's output"))
    n, device, k = embeddings.shape[0], embeddings.device, partners_per_image
    emb = torch.nn.functional.normalize(embeddings, dim=1) if normalize else embeddings
    emb_t = emb.t().contiguous()  # (D, N), as select_partners builds it: same scores bit for bit
    group, dup = _codes(groups, n, "groups"), _codes(duplicates, n, "duplicates")
    rows_all = torch.arange(n) if query_rows is None else torch.as_tensor(list(query_rows), dtype=torch.int64)
    if rows_all.numel() and (int(rows_all.min()) < 0 or int(rows_all.max()) >= n):
        raise ConfigError(explain("query_rows out of range", got=(int(rows_all.min()), int(rows_all.max())),
                                  expected=f"0 <= row < {n}"))
    # candidates per row from the labels: same group, not the row's duplicate group (itself included)
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
            scores = emb[rows] @ emb_t  # (c, N)
            scores[torch.arange(c, device=device), rows] = float("-inf")
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
    return result
