"""Retrieval metrics by counting, chunked over the gallery: Recall@K, Recall_subset@K, top-k rows.

Ranking rule (one rule everywhere, deterministic): candidates are ordered by score, best first, and
among equal scores the lower gallery row first. The target's rank is the number of (non-excluded)
candidates ordered before it; Recall@K = percentage of queries whose rank < K.

Nothing is sorted: each gallery chunk's scores are compared with the target's score and the candidates
that beat it are counted, so memory is one (query block, chunk) score block whatever the gallery size
(10k queries x 1M rows: tens of MB on top of the gallery). Scoring and chunk sizes are
:mod:`cir_plugins.similarity`'s (a CUDA bf16 gallery gives the ranks of fp32-accumulated scores, not of
bf16-rounded ones). The target's own score is an elementwise product, so a candidate within float32
rounding of it may fall on either side; exact ties (duplicated images) follow the rule. Nothing in the
chunk loop synchronises with the host: masks are scatters of -inf, and top-k merges per-chunk
``torch.topk`` results, redoing after the loop with exact (score, row) keys the queries whose k-th
score a tie may have decided (one host sync per query block).

Reference removal (CIRR): ``exclude_rows`` (Q, K), -1 padded, removes those candidates from query i's
ranking (never counted nor returned); excluding a query's own target is an error. ``subset_rows``
(Q, S), -1 padded: Recall_subset@K ranks only those rows (minus excluded ones and duplicates), the
target among them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from . import similarity as S
from ._console import progress_bar
from .checks import check_embeddings, check_ks, check_not_excluded, check_rows, settle
from .errors import ConfigError, ShapeError, explain

__all__ = ["retrieval_metrics", "target_ranks", "subset_ranks", "topk_rows", "recall_at"]

logger = logging.getLogger(__name__)

QUERY_BLOCK = 8192  # queries scored together; more are processed block by block


def _check_ranking(query, gallery, target_rows, exclude_rows, similarity, subset_rows=None) -> None:
    """Every check of a ranking call, one host sync."""
    n_q, n_g = query.shape[0], gallery.shape[0]
    settle(check_embeddings(query, gallery, similarity)
           + check_rows("target_rows", target_rows, n_q, n_g, query.device, padded=False)
           + check_rows("exclude_rows", exclude_rows, n_q, n_g, query.device, padded=True)
           + check_rows("subset_rows", subset_rows, n_q, n_g, query.device, padded=True)
           + check_not_excluded(target_rows, exclude_rows))


def _blocks(n_queries: int):
    for q0 in range(0, n_queries, QUERY_BLOCK):
        yield q0, min(q0 + QUERY_BLOCK, n_queries)


def target_ranks(query: torch.Tensor, gallery: torch.Tensor, target_rows: torch.Tensor, *,
                 exclude_rows: torch.Tensor | None = None, chunk_size: int | None = None,
                 similarity: str = "dot", show_progress: bool = False) -> torch.Tensor:
    """0-based rank of each query's target in the whole gallery, by counting (module docstring). query (Q, D);
    gallery (G, D) or (G, T, D); target_rows (Q,) int64; exclude_rows (Q, K) int64, -1 padded -> (Q,) int64."""
    _check_ranking(query, gallery, target_rows, exclude_rows, similarity)
    return _target_ranks(query, gallery, target_rows, exclude_rows, chunk_size, similarity, show_progress)


def _target_ranks(query, gallery, target_rows, exclude_rows, chunk_size, similarity, show_progress):
    """Candidates of ``gallery`` that beat each target (checked inputs)."""
    n_q, n_g = query.shape[0], gallery.shape[0]
    tokens = gallery.shape[1] if similarity == "max_token" else 1
    bf16 = S.use_bf16_scoring(query, gallery)
    ranks = torch.zeros(n_q, dtype=torch.int64, device=query.device)
    for q0, q1 in _blocks(n_q):
        q, tr = query[q0:q1], target_rows[q0:q1]  # (Qb, D), (Qb,) global rows
        q_split = S.split_bf16(q) if bf16 else None  # split once per block, not per chunk
        # removed from counting: the excluded rows and the target itself (it never beats itself)
        masked = tr[:, None] if exclude_rows is None else torch.cat([tr[:, None], exclude_rows[q0:q1]], 1)
        ts = S.scores_of_rows(q, gallery, tr[:, None], similarity, bf16)  # (Qb, 1)
        step = S.chunk_rows(q.shape[0], tokens, chunk_size, query.device)
        for start in progress_bar(range(0, n_g, step), desc="ranking gallery chunks", show_progress=show_progress,
                                  leave=False):
            stop = min(start + step, n_g)
            scores = S.similarity(q, gallery[start:stop], similarity, bf16=bf16, split_query=q_split)  # (Qb, C)
            S.mask_rows_(scores, masked, start)  # -inf never beats a finite target score
            rows = torch.arange(start, stop, device=query.device)  # (C,)
            # a candidate before the target's row beats it on a tie; one after it must score strictly higher
            ranks[q0:q1] += torch.where(rows[None, :] < tr[:, None], scores >= ts, scores > ts).sum(dim=1)
    return ranks


def subset_ranks(query: torch.Tensor, gallery: torch.Tensor, target_rows: torch.Tensor, subset_rows: torch.Tensor, *,
                 exclude_rows: torch.Tensor | None = None, similarity: str = "dot") -> torch.Tensor:
    """0-based rank of each target among its query's subset rows only (same rule): subset_rows (Q, S) int64,
    -1 padded, holding the target; duplicates and excluded rows in it are ignored. Returns (Q,) int64."""
    _check_ranking(query, gallery, target_rows, exclude_rows, similarity, subset_rows)
    return _subset_ranks(target_rows, subset_rows, exclude_rows,
                         lambda rows: S.scores_of_rows(query, gallery, rows, similarity))


def _subset_ranks(target_rows, subset_rows, exclude_rows, score_rows: Callable[[torch.Tensor], torch.Tensor]):
    """Ranks among the subset rows; ``score_rows(rows (Q, S)) -> (Q, S) float32`` scores them."""
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
        valid &= ~(rows[:, :, None] == exclude_rows[:, None, :]).any(2)  # (Q, S, K) -> (Q, S)
    scores = score_rows(rows.clamp_min(0))  # (Q, S)
    target_score = scores[is_target]  # (Q,): exactly one per row; same computation as the others
    beats = (scores > target_score[:, None]) | ((scores == target_score[:, None]) & (rows < target_rows[:, None]))
    beats &= valid & ~is_target
    return beats.sum(dim=1)


def recall_at(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of ranks below each k: {k: 100 * mean(ranks < k)}. ranks (Q,) int64."""
    return {k: float((ranks < k).double().mean()) * 100.0 for k in ks}


def recall_table(ranks: torch.Tensor, ks: Sequence[int], subset: torch.Tensor | None = None,
                 subset_ks: Sequence[int] = (1, 2, 3)) -> dict[str, float]:
    """{"R@k"} from the full ranks and, with subset ranks, {"Rs@k"} and "Rmean" = (R@5 + Rs@1) / 2."""
    full = recall_at(ranks, sorted(set(ks) | {5}))
    out = {f"R@{k}": full[k] for k in ks}
    if subset is not None:
        sub = recall_at(subset, sorted(set(subset_ks) | {1}))
        out.update({f"Rs@{k}": sub[k] for k in subset_ks})
        out["Rmean"] = (full[5] + sub[1]) / 2.0
    return out


def retrieval_metrics(query: torch.Tensor, gallery: torch.Tensor, target_rows: torch.Tensor, *,
                      ks: Sequence[int] = (1, 5, 10, 50), exclude_rows: torch.Tensor | None = None,
                      subset_rows: torch.Tensor | None = None, subset_ks: Sequence[int] = (1, 2, 3),
                      chunk_size: int | None = None, similarity: str = "dot",
                      show_progress: bool = False) -> dict[str, float]:
    """Recall@K over the whole gallery (and Recall_subset@K over per-query subsets), in percent.

    Args:
        query: (Q, D) query embeddings; gallery: (G, D), or (G, T, D) with ``similarity="max_token"``.
        target_rows: (Q,) int64, the target's row in the gallery.
        ks, subset_ks: the K of "R@K" and of "Rs@K".
        exclude_rows: (Q, K) int64, -1 padded: candidates removed from query i's rankings (CIRR removes
            the reference image); excluding the target is an error.
        subset_rows: (Q, S) int64, -1 padded: the rows "Rs@K" ranks (must contain the target).
        chunk_size: gallery rows scored at once; None sizes chunks from memory (:func:`similarity.chunk_rows`).
        show_progress: a tqdm bar over gallery chunks.
    Returns {"R@k" for k in ks} and, with subset_rows, {"Rs@k"} and "Rmean" = (R@5 + Rs@1) / 2 (even if 5 / 1
    are not among the ks).
    """
    ks = check_ks("ks", ks)
    if subset_rows is not None:
        subset_ks = check_ks("subset_ks", subset_ks)
    _check_ranking(query, gallery, target_rows, exclude_rows, similarity, subset_rows)
    ranks = _target_ranks(query, gallery, target_rows, exclude_rows, chunk_size, similarity, show_progress)
    s_ranks = None if subset_rows is None else _subset_ranks(
        target_rows, subset_rows, exclude_rows, lambda rows: S.scores_of_rows(query, gallery, rows, similarity))
    out = recall_table(ranks, ks, s_ranks, subset_ks)
    logger.debug("retrieval metrics over %d queries and %d gallery rows: %s", query.shape[0], gallery.shape[0], out)
    return out


_LOW32 = (1 << 32) - 1
_LOWEST = torch.iinfo(torch.int64).min  # the key of a missing or excluded candidate


def _order_keys(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (score desc, row asc) as plain descending integers, distinct per row: scores (Q, C)
    float32 finite, rows (C,) or (Q, C) int64 < 2**32 -> ordered_bits(score) * 2**32 + (2**32 - 1 - row),
    where ordered_bits maps float32 to int32 monotonically (sign-magnitude -> two's complement order)."""
    bits = (scores + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0 so they tie
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits to reverse their order
    low = _LOW32 - rows
    return ordered.to(torch.int64) * (1 << 32) + (low[None, :] if low.dim() == 1 else low)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _LOW32 - (keys & _LOW32)
    ordered = (keys >> 32).to(torch.int32)  # arithmetic shift: the high 32 bits
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)  # the map is its own inverse
    return bits.view(torch.float32), rows


def topk_rows(query: torch.Tensor, gallery: torch.Tensor, k: int, *, exclude_rows: torch.Tensor | None = None,
              chunk_size: int | None = None, similarity: str = "dot",
              show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery rows of each query, best first, ties to the lower row; chunked. query (Q, D); gallery
    (G, D) or (G, T, D); exclude_rows (Q, K) int64, -1 padded, never returned. Returns (scores (Q, k) float32,
    rows (Q, k) int64); a query with fewer than k candidates gets score -inf and row -1 in the missing tail."""
    checks = check_embeddings(query, gallery, similarity)
    n_q, n_g = query.shape[0], gallery.shape[0]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n_g:
        raise ConfigError(explain("k must be a positive int no larger than the gallery", got=k,
                                  expected=f"1..{n_g}", fix="ask for at most as many rows as the gallery has"))
    if n_g >= 1 << 31:
        raise ShapeError(explain("gallery too large for top-k keys", got=n_g, expected="< 2**31 rows",
                                 fix="split the gallery"))
    settle(checks + check_rows("exclude_rows", exclude_rows, n_q, n_g, query.device, padded=True))
    tokens = gallery.shape[1] if similarity == "max_token" else 1
    bf16 = S.use_bf16_scoring(query, gallery)
    out_scores = torch.empty(n_q, k, dtype=torch.float32, device=query.device)
    out_rows = torch.empty(n_q, k, dtype=torch.int64, device=query.device)
    for q0, q1 in _blocks(n_q):
        q = query[q0:q1]
        q_split = S.split_bf16(q) if bf16 else None
        ex = exclude_rows[q0:q1] if exclude_rows is not None else None
        step = S.chunk_rows(q.shape[0], tokens, chunk_size, query.device)
        best = torch.full((q.shape[0], k), _LOWEST, dtype=torch.int64, device=query.device)  # (Qb, k) running keys
        # per query, the largest chunk k-th value at which torch.topk chose among more tied scores than it kept
        lost_tie = torch.full((q.shape[0],), float("-inf"), device=query.device)
        for start in progress_bar(range(0, n_g, step), desc="top-k over gallery chunks", show_progress=show_progress,
                                  leave=False):
            stop = min(start + step, n_g)
            scores = S.similarity(q, gallery[start:stop], similarity, bf16=bf16, split_query=q_split)  # (Qb, C)
            if ex is not None:
                S.mask_rows_(scores, ex, start)  # excluded rows -> -inf
            values, cols, lost = _chunk_topk(scores, min(k, stop - start))  # (Qb, kc), plain float values
            lost_tie = torch.maximum(lost_tie, lost)
            keys = _order_keys(values, cols + start)  # (Qb, kc): the row tie-break on the small merge only
            keys.masked_fill_(values == float("-inf"), _LOWEST)  # excluded rows
            best = torch.cat([best, keys], dim=1).topk(k, dim=1).values  # (Qb, k + kc) -> (Qb, k), keys distinct
        # the result is exact unless a lost tie reached the final k-th score (or candidates ran out)
        redo = (lost_tie >= _decode_keys(best[:, -1])[0]) | (best[:, -1] == _LOWEST)
        if bool(redo.any()):  # one host sync per query block, after the loop
            idx = redo.nonzero().flatten()
            logger.debug("top-k: %d of %d queries tie at the k-th score; exact keys for them", len(idx), len(redo))
            best[idx] = _topk_keys_exact(q[idx], gallery, k, ex[idx] if ex is not None else None, step, similarity)
        (scores, rows), missing = _decode_keys(best), best == _LOWEST
        out_scores[q0:q1] = scores.masked_fill(missing, float("-inf"))
        out_rows[q0:q1] = rows.masked_fill(missing, -1)
    return out_scores, out_rows


# Scores per group of topk_rows' candidate filter: a chunk's top k lie in the k groups with the largest maxima
# (ties aside), so torch.topk runs over (Q, C / TOPK_GROUP) maxima and (Q, k * TOPK_GROUP) candidates, not the
# whole (Q, C) block. 0 turns the filter off.
TOPK_GROUP = 128


def _chunk_topk(scores: torch.Tensor, kc: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kc largest scores of each row of scores (Qb, C) (any order), their columns, and per row the largest
    value at which a tie may have been decided arbitrarily (-inf when none; the caller redoes those rows)."""
    (n_q, c), size = scores.shape, TOPK_GROUP
    lost = torch.full((n_q,), float("-inf"), device=scores.device)
    n_groups = c // size if size else 0
    cand, cand_cols = scores, None
    if n_groups >= 2 * kc:
        whole = n_groups * size
        grouped = scores[:, :whole].view(n_q, n_groups, size)  # (Qb, G, S), a view
        maxima = grouped.amax(dim=2)  # (Qb, G)
        top_max, groups = maxima.topk(kc, dim=1, sorted=False)  # (Qb, kc)
        kth_group = top_max.amin(dim=1)
        tied = (maxima >= kth_group[:, None]).sum(dim=1) > kc
        lost = torch.where(tied, kth_group, lost)
        cand = grouped.gather(1, groups[:, :, None].expand(-1, -1, size)).view(n_q, kc * size)
        cand_cols = (groups[:, :, None] * size + torch.arange(size, device=scores.device)).view(n_q, kc * size)
        if whole < c:  # the chunk's last columns, fewer than a group: candidates as they are
            cand = torch.cat([cand, scores[:, whole:]], dim=1)
            cand_cols = torch.cat([cand_cols, torch.arange(whole, c, device=scores.device).expand(n_q, -1)], dim=1)
    values, idx = cand.topk(kc, dim=1, sorted=False)
    if kc < cand.shape[1]:
        kth = values.amin(dim=1)  # (Qb,) the chunk's k-th value
        crowded = (cand >= kth[:, None]).sum(dim=1) > kc  # ties at kth: topk's pick is arbitrary
        lost = torch.maximum(lost, torch.where(crowded, kth, float("-inf")))
    return values, (idx if cand_cols is None else cand_cols.gather(1, idx)), lost


def _topk_keys_exact(q, gallery, k, ex, step, similarity):
    """Running top-k of (score, row) int64 keys over every row, the tie rule applied everywhere: q (Qr, D);
    ex (Qr, K) or None -> (Qr, k) int64 keys, best first; lowest int64 where missing."""
    n_g, bf16 = gallery.shape[0], S.use_bf16_scoring(q, gallery)
    best = torch.full((q.shape[0], k), _LOWEST, dtype=torch.int64, device=q.device)
    for start in range(0, n_g, step):
        stop = min(start + step, n_g)
        scores = S.similarity(q, gallery[start:stop], similarity, bf16=bf16)  # (Qr, C)
        keys = _order_keys(scores, torch.arange(start, stop, device=q.device))  # (Qr, C)
        if ex is not None:
            S.mask_rows_(keys, ex, start)  # excluded rows -> lowest key
        best = torch.cat([best, keys], dim=1).topk(k, dim=1).values  # (Qr, k + C) -> (Qr, k)
    return best
