"""Retrieval metrics by counting, chunked over the gallery: Recall@K, Recall_subset@K, top-k rows.

Ranking rule (one rule everywhere, deterministic):
    candidates are ordered by score, best first; among equal scores the lower gallery row comes
    first. The target's rank is the number of (non-excluded) candidates ordered before it: those
    with a strictly higher score, plus those with an equal score and a lower gallery row.
    Recall@K = percentage of queries whose rank < K.

Nothing is sorted: each gallery chunk's scores are compared with the target's score and the
candidates that beat it are counted, so memory is one (query block, chunk) score block whatever the
gallery size (10k queries x 1M gallery rows: tens of MB on top of the gallery itself).

Scores are computed in float32 (embeddings are upcast chunk by chunk): ``"dot"`` is the inner
product of (Q, D) queries with (G, D) gallery rows; ``"max_token"`` is the maximum over T of the
inner products with a (G, T, D) gallery. The library L2-normalises embeddings before calling these
functions, so "dot" is the cosine similarity. The target's own score is computed separately from
the chunk scores (an elementwise product, not the same matrix product), so a candidate within
float32 rounding of the target may fall on either side of it; exact ties (duplicated images,
exactly representable embeddings) follow the rule above.

Reference removal (CIRR): ``exclude_rows`` (Q, K), -1 padded, removes those candidates from query
i's ranking (they are not counted, and never returned by :func:`topk_rows`). Excluding a query's
own target is an error. ``subset_rows`` (Q, S), -1 padded: Recall_subset@K ranks only those rows
(minus any excluded ones and duplicates); the target must be among them.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .errors import ConfigError, DeviceError, DTypeError, NonFiniteError, ShapeError, explain

__all__ = [
    "retrieval_metrics",
    "target_ranks",
    "subset_ranks",
    "topk_rows",
    "recall_at",
    "score_chunk",
    "SCORE_BUDGET_BYTES",
]

logger = logging.getLogger(__name__)

SIMILARITIES = ("dot", "max_token")
# Bytes of one (query block, chunk, T) float32 score block.
SCORE_BUDGET_BYTES = 32 << 20
# Queries scored together; more queries than this are processed block by block.
QUERY_BLOCK = 8192
_MIN_CHUNK = 16


# --------------------------------------------------------------------------------------------
# validation and shared pieces
# --------------------------------------------------------------------------------------------

def _check_embeddings(query: torch.Tensor, gallery: torch.Tensor, similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ConfigError(explain("unknown similarity", got=similarity, expected=" or ".join(SIMILARITIES),
                                  fix="use 'dot' for (G, D) galleries and 'max_token' for (G, T, D)"))
    for name, tensor in (("query", query), ("gallery", gallery)):
        if not isinstance(tensor, torch.Tensor):
            raise DTypeError(explain(f"{name} must be a torch.Tensor", got=type(tensor).__name__,
                                     fix=f"pass {name} embeddings as a tensor"))
        if not tensor.is_floating_point():
            raise DTypeError(explain(f"{name} must be a floating tensor", got=tensor.dtype, fix="use .float()"))
    if query.dim() != 2:
        raise ShapeError(explain("query must be 2-D (Q, D)", got=tuple(query.shape),
                                 fix="stack the query embeddings into one (Q, D) tensor"))
    want = 2 if similarity == "dot" else 3
    if gallery.dim() != want:
        layout = "(G, D)" if similarity == "dot" else "(G, T, D)"
        raise ShapeError(explain(f"a gallery for similarity {similarity!r} must be {want}-D {layout}",
                                 got=tuple(gallery.shape),
                                 fix="use similarity='max_token' for multi-vector galleries and 'dot' otherwise"))
    if query.shape[0] == 0 or gallery.shape[0] == 0 or query.shape[1] == 0:
        raise ShapeError(explain("query and gallery must be non-empty", got=(tuple(query.shape), tuple(gallery.shape)),
                                 fix="pass at least one query and one gallery row"))
    if gallery.shape[-1] != query.shape[1]:
        raise ShapeError(explain("query and gallery embedding dims differ", got=(query.shape[1], gallery.shape[-1]),
                                 expected="the same D", fix="embed queries and gallery with the same model"))
    if gallery.device != query.device:
        raise DeviceError(explain("query and gallery must be on one device", got=(str(query.device), str(gallery.device)),
                                  fix="move the gallery with .to(query.device)"))
    if not bool(torch.isfinite(query).all()):
        bad = (~torch.isfinite(query)).any(1).nonzero().flatten()[:5].tolist()
        raise NonFiniteError(explain("query embeddings contain NaN or infinity", got=f"query rows {bad}",
                                     fix="check the model output"))
    if not bool(torch.isfinite(gallery).all()):
        bad = (~torch.isfinite(gallery)).flatten(1).any(1).nonzero().flatten()[:5].tolist()
        raise NonFiniteError(explain("gallery embeddings contain NaN or infinity", got=f"gallery rows {bad}",
                                     fix="re-embed those images"))


def _check_rows(name: str, rows: Optional[torch.Tensor], n_queries: int, n_gallery: int, device,
                padded: bool) -> None:
    if rows is None:
        return
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64:
        got = rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise DTypeError(explain(f"{name} must be an int64 tensor", got=got, fix="use torch.as_tensor(...).long()"))
    want = "(Q, K), -1 padded" if padded else "(Q,)"
    ok_shape = rows.dim() == (2 if padded else 1) and rows.shape[0] == n_queries
    if not ok_shape:
        raise ShapeError(explain(f"{name} must be {want} with Q = {n_queries} queries", got=tuple(rows.shape),
                                 fix="give one entry (row) per query"))
    if rows.device != device:
        raise DeviceError(explain(f"{name} must be on the query's device", got=str(rows.device), expected=str(device),
                                  fix=f"move {name} with .to(query.device)"))
    low = -1 if padded else 0
    out = (rows < low) | (rows >= n_gallery)
    if bool(out.any()):
        where = out.nonzero()[0].tolist()
        value = int(rows[tuple(where)])
        raise ShapeError(explain(f"{name} out of range", got=f"{value} for query {where[0]}",
                                 expected=f"gallery rows in [0, {n_gallery})" + (" or -1 as padding" if padded else ""),
                                 fix="index the gallery by row" + (" and pad with -1" if padded else "")))


def _check_not_excluded(target_rows: torch.Tensor, exclude_rows: Optional[torch.Tensor]) -> None:
    if exclude_rows is None:
        return
    clash = (exclude_rows == target_rows[:, None]).any(1)
    if bool(clash.any()):
        bad = clash.nonzero().flatten()[:5].tolist()
        raise ConfigError(explain("a query's target is among its excluded rows", got=f"queries {bad}",
                                  fix="exclude only the reference image (and its duplicates), never the target"))


def _check_ks(name: str, ks: Sequence[int]) -> Tuple[int, ...]:
    try:
        values = tuple(ks)
    except TypeError:
        values = ()
    if not values or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in values):
        raise ConfigError(explain(f"{name} must be a non-empty sequence of positive ints", got=ks,
                                  fix="e.g. (1, 5, 10, 50)"))
    return values


def _chunk_rows(n_queries: int, tokens: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ConfigError(explain("chunk_size must be a positive int or None", got=chunk_size,
                                      fix="leave it None to size chunks from memory"))
        return chunk_size
    return max(_MIN_CHUNK, SCORE_BUDGET_BYTES // (4 * max(1, n_queries) * max(1, tokens)))


def score_chunk(query: torch.Tensor, gallery_chunk: torch.Tensor, similarity: str) -> torch.Tensor:
    """float32 scores of every query against every row of a gallery chunk.

    query (Q, D); gallery_chunk (C, D) for "dot" or (C, T, D) for "max_token". Returns (Q, C).
    """
    q = query.float()
    g = gallery_chunk.float()
    if similarity == "dot":
        return q @ g.T  # (Q, D) @ (D, C) -> (Q, C)
    c, t, d = g.shape
    return (q @ g.reshape(c * t, d).T).view(q.shape[0], c, t).amax(dim=2)  # (Q, C*T) -> (Q, C, T) -> (Q, C)


def _scores_of_rows(query: torch.Tensor, gallery: torch.Tensor, rows: torch.Tensor, similarity: str) -> torch.Tensor:
    """float32 score of query i with gallery rows[i, j]. query (Q, D); rows (Q, S) valid rows -> (Q, S)."""
    q = query.float()
    g = gallery[rows].float()  # (Q, S, D) or (Q, S, T, D)
    if similarity == "dot":
        return torch.einsum("qd,qsd->qs", q, g)
    return torch.einsum("qd,qstd->qst", q, g).amax(dim=2)


def _excluded_in_chunk(exclude_rows: torch.Tensor, start: int, stop: int):
    """(query index, column in chunk) of the exclusions inside gallery rows [start, stop)."""
    local = exclude_rows - start  # (Qb, K)
    hit = (exclude_rows >= 0) & (local >= 0) & (local < stop - start)
    qi, ki = hit.nonzero(as_tuple=True)
    return qi, local[qi, ki]


def _blocks(n_queries: int):
    for q0 in range(0, n_queries, QUERY_BLOCK):
        yield q0, min(q0 + QUERY_BLOCK, n_queries)


# --------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------

def target_ranks(query: torch.Tensor, gallery: torch.Tensor, target_rows: torch.Tensor, *,
                 exclude_rows: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                 similarity: str = "dot", show_progress: bool = False) -> torch.Tensor:
    """0-based rank of each query's target in the whole gallery, by counting (see module docstring).

    query (Q, D); gallery (G, D) or (G, T, D); target_rows (Q,) int64; exclude_rows (Q, K) int64,
    -1 padded. Returns (Q,) int64 on the query's device.
    """
    _check_embeddings(query, gallery, similarity)
    n_q, n_g = query.shape[0], gallery.shape[0]
    _check_rows("target_rows", target_rows, n_q, n_g, query.device, padded=False)
    _check_rows("exclude_rows", exclude_rows, n_q, n_g, query.device, padded=True)
    _check_not_excluded(target_rows, exclude_rows)
    return _target_ranks(query, gallery, target_rows, exclude_rows, chunk_size, similarity, show_progress)


def _target_ranks(query, gallery, target_rows, exclude_rows, chunk_size, similarity, show_progress):
    n_q, n_g = query.shape[0], gallery.shape[0]
    tokens = gallery.shape[1] if similarity == "max_token" else 1
    ranks = torch.zeros(n_q, dtype=torch.int64, device=query.device)
    for q0, q1 in _blocks(n_q):
        q = query[q0:q1]
        tr = target_rows[q0:q1]  # (Qb,)
        ex = exclude_rows[q0:q1] if exclude_rows is not None else None
        target_score = _scores_of_rows(q, gallery, tr[:, None], similarity)[:, 0]  # (Qb,)
        step = _chunk_rows(q.shape[0], tokens, chunk_size)
        counts = torch.zeros(q.shape[0], dtype=torch.int64, device=query.device)
        for start in tqdm(range(0, n_g, step), desc="ranking gallery chunks", disable=not show_progress,
                          leave=False):
            stop = min(start + step, n_g)
            scores = score_chunk(q, gallery[start:stop], similarity)  # (Qb, C)
            rows = torch.arange(start, stop, device=query.device)  # (C,)
            higher = scores > target_score[:, None]
            tie_before = (scores == target_score[:, None]) & (rows[None, :] < tr[:, None])
            beats = (higher | tie_before) & (rows[None, :] != tr[:, None])  # the target never beats itself
            if ex is not None:
                qi, col = _excluded_in_chunk(ex, start, stop)
                beats[qi, col] = False  # removed candidates are not counted
            counts += beats.sum(dim=1)
        ranks[q0:q1] = counts
    return ranks


def subset_ranks(query: torch.Tensor, gallery: torch.Tensor, target_rows: torch.Tensor, subset_rows: torch.Tensor, *,
                 exclude_rows: Optional[torch.Tensor] = None, similarity: str = "dot") -> torch.Tensor:
    """0-based rank of each target among its query's subset rows only (same ordering rule).

    subset_rows (Q, S) int64, -1 padded; duplicates and excluded rows inside it are ignored; the
    target must be one of them. Returns (Q,) int64.
    """
    _check_embeddings(query, gallery, similarity)
    n_q, n_g = query.shape[0], gallery.shape[0]
    _check_rows("target_rows", target_rows, n_q, n_g, query.device, padded=False)
    _check_rows("exclude_rows", exclude_rows, n_q, n_g, query.device, padded=True)
    _check_rows("subset_rows", subset_rows, n_q, n_g, query.device, padded=True)
    _check_not_excluded(target_rows, exclude_rows)
    return _subset_ranks(query, gallery, target_rows, subset_rows, exclude_rows, similarity)


def _subset_ranks(query, gallery, target_rows, subset_rows, exclude_rows, similarity):
    rows, _ = subset_rows.sort(dim=1)  # (Q, S) ascending: -1 padding first, duplicates adjacent
    valid = rows >= 0
    valid[:, 1:] &= rows[:, 1:] != rows[:, :-1]  # keep the first of each duplicate
    is_target = valid & (rows == target_rows[:, None])  # (Q, S)
    missing = ~is_target.any(1)
    if bool(missing.any()):
        bad = missing.nonzero().flatten()[:5].tolist()
        raise ConfigError(explain("a query's target is not among its subset rows", got=f"queries {bad}",
                                  fix="include the target in subset_rows (CIRR: img_set members minus the reference)"))
    if exclude_rows is not None:
        removed = (rows[:, :, None] == exclude_rows[:, None, :]).any(2)  # (Q, S, K) -> (Q, S)
        valid &= ~removed
    scores = _scores_of_rows(query, gallery, rows.clamp_min(0), similarity)  # (Q, S)
    target_score = scores[is_target]  # (Q,): exactly one per row; same computation as the others
    beats = (scores > target_score[:, None]) | ((scores == target_score[:, None]) & (rows < target_rows[:, None]))
    beats &= valid & ~is_target
    return beats.sum(dim=1)


def recall_at(ranks: torch.Tensor, ks: Sequence[int]) -> Dict[int, float]:
    """Percentage of ranks below each k: {k: 100 * mean(ranks < k)}. ranks (Q,) int64."""
    return {k: float((ranks < k).double().mean()) * 100.0 for k in ks}


def retrieval_metrics(query: torch.Tensor, gallery: torch.Tensor, target_rows: torch.Tensor, *,
                      ks: Sequence[int] = (1, 5, 10, 50), exclude_rows: Optional[torch.Tensor] = None,
                      subset_rows: Optional[torch.Tensor] = None, subset_ks: Sequence[int] = (1, 2, 3),
                      chunk_size: Optional[int] = None, similarity: str = "dot",
                      show_progress: bool = False) -> Dict[str, float]:
    """Recall@K over the whole gallery (and Recall_subset@K over per-query subsets), in percent.

    Args:
        query: (Q, D) query embeddings.
        gallery: (G, D), or (G, T, D) with ``similarity="max_token"``.
        target_rows: (Q,) int64, the target's row in the gallery.
        ks: the K of "R@K".
        exclude_rows: (Q, K) int64, -1 padded: candidates removed from query i's rankings (CIRR
            removes the reference image). Excluding the target is an error.
        subset_rows: (Q, S) int64, -1 padded: the rows "Rs@K" ranks (must contain the target).
        subset_ks: the K of "Rs@K".
        chunk_size: gallery rows scored at once; None sizes chunks from SCORE_BUDGET_BYTES.
        similarity: "dot" or "max_token".
        show_progress: show a tqdm bar over gallery chunks.

    Returns:
        {"R@k": float for k in ks} and, with subset_rows, {"Rs@k": ...} and
        "Rmean" = (R@5 + Rs@1) / 2 (computed even if 5 / 1 are not among the ks).
    """
    ks = _check_ks("ks", ks)
    _check_embeddings(query, gallery, similarity)
    n_q, n_g = query.shape[0], gallery.shape[0]
    _check_rows("target_rows", target_rows, n_q, n_g, query.device, padded=False)
    _check_rows("exclude_rows", exclude_rows, n_q, n_g, query.device, padded=True)
    _check_not_excluded(target_rows, exclude_rows)
    if subset_rows is not None:
        subset_ks = _check_ks("subset_ks", subset_ks)
        _check_rows("subset_rows", subset_rows, n_q, n_g, query.device, padded=True)
    ranks = _target_ranks(query, gallery, target_rows, exclude_rows, chunk_size, similarity, show_progress)
    full = recall_at(ranks, sorted(set(ks) | {5}))
    out = {f"R@{k}": full[k] for k in ks}
    if subset_rows is not None:
        s_ranks = _subset_ranks(query, gallery, target_rows, subset_rows, exclude_rows, similarity)
        sub = recall_at(s_ranks, sorted(set(subset_ks) | {1}))
        out.update({f"Rs@{k}": sub[k] for k in subset_ks})
        out["Rmean"] = (full[5] + sub[1]) / 2.0
    logger.debug("retrieval metrics over %d queries and %d gallery rows: %s", n_q, n_g, out)
    return out


# --------------------------------------------------------------------------------------------
# top-k rows (submission files)
# --------------------------------------------------------------------------------------------

_LOW32 = (1 << 32) - 1


def _order_keys(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys that order (score desc, row asc) as plain descending integers; all distinct per row.

    scores (Q, C) float32 finite; rows (C,) int64 < 2**32. key = ordered_bits(score) * 2**32 + (2**32-1-row),
    where ordered_bits maps float32 to int32 monotonically (sign-magnitude -> two's complement order).
    """
    bits = (scores + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0 so they tie
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits to reverse their order
    return ordered.to(torch.int64) * (1 << 32) + (_LOW32 - rows)[None, :]


def _decode_keys(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = _LOW32 - (keys & _LOW32)
    ordered = (keys >> 32).to(torch.int32)  # arithmetic shift: the high 32 bits
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)  # the map is its own inverse
    return bits.view(torch.float32), rows


def topk_rows(query: torch.Tensor, gallery: torch.Tensor, k: int, *, exclude_rows: Optional[torch.Tensor] = None,
              chunk_size: Optional[int] = None, similarity: str = "dot",
              show_progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery rows of each query, best first, ties to the lower row; chunked.

    query (Q, D); gallery (G, D) or (G, T, D); exclude_rows (Q, K) int64, -1 padded, never
    returned. Returns (scores (Q, k) float32, rows (Q, k) int64). When a query has fewer than k
    non-excluded candidates, the missing tail is score -inf and row -1.
    """
    _check_embeddings(query, gallery, similarity)
    n_q, n_g = query.shape[0], gallery.shape[0]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n_g:
        raise ConfigError(explain("k must be a positive int no larger than the gallery", got=k,
                                  expected=f"1..{n_g}", fix="ask for at most as many rows as the gallery has"))
    if n_g >= 1 << 31:
        raise ShapeError(explain("gallery too large for top-k keys", got=n_g, expected="< 2**31 rows",
                                 fix="split the gallery"))
    _check_rows("exclude_rows", exclude_rows, n_q, n_g, query.device, padded=True)
    tokens = gallery.shape[1] if similarity == "max_token" else 1
    lowest = torch.iinfo(torch.int64).min
    out_scores = torch.empty(n_q, k, dtype=torch.float32, device=query.device)
    out_rows = torch.empty(n_q, k, dtype=torch.int64, device=query.device)
    for q0, q1 in _blocks(n_q):
        q = query[q0:q1]
        ex = exclude_rows[q0:q1] if exclude_rows is not None else None
        step = _chunk_rows(q.shape[0], tokens, chunk_size)
        best = torch.full((q.shape[0], k), lowest, dtype=torch.int64, device=query.device)  # (Qb, k) running keys
        for start in tqdm(range(0, n_g, step), desc="top-k over gallery chunks", disable=not show_progress,
                          leave=False):
            stop = min(start + step, n_g)
            scores = score_chunk(q, gallery[start:stop], similarity)  # (Qb, C)
            keys = _order_keys(scores, torch.arange(start, stop, device=query.device))  # (Qb, C)
            if ex is not None:
                qi, col = _excluded_in_chunk(ex, start, stop)
                keys[qi, col] = lowest
            merged = torch.cat([best, keys], dim=1)  # (Qb, k + C)
            best = merged.topk(k, dim=1).values  # keys are distinct, so the order is unique
        scores, rows = _decode_keys(best)
        missing = best == lowest
        out_scores[q0:q1] = scores.masked_fill(missing, float("-inf"))
        out_rows[q0:q1] = rows.masked_fill(missing, -1)
    return out_scores, out_rows
