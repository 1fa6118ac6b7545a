"""Multi-GPU (or multi-process) bank loss and retrieval with the bank sharded across ranks.

Under ``torchrun`` each rank holds a contiguous slice of the bank / gallery rows,
``[row_offset, row_offset + n_local)`` with ``shard_rows(n_total, rank, world)``. Nothing here
ever gathers the bank itself; only per-query statistics travel.

Loss (:func:`sharded_bank_contrastive_loss`). Every rank brings its own queries (data-parallel
training). The queries of all ranks are all-gathered (B_total x D, small); every rank computes for
all of them the bank statistics over its shard with the library's one core
(:func:`cir_plugins.negatives.loss.sharded_loss`, torch or Triton backend) and the target term of
the targets it owns; :class:`_Shard` then combines them across ranks exactly as the chunks of one
bank are combined: one all-reduce of the max, one all-reduce of the rescaled sums together with the
owners' target terms. Each rank keeps its own queries and hands them to the one autograd Function,
whose backward is local (each query's loss term lives on one rank and its statistics were reduced in
the forward). The returned loss is the mean over this rank's queries, equal (to rounding) to
``bank_contrastive_loss`` of these queries against the full bank; with equal batch sizes the usual
DDP gradient averaging then gives the gradient of the global mean.

Retrieval (:func:`sharded_retrieval_metrics`, :func:`sharded_topk`). Every rank brings the same
queries and a shard of the gallery. Ranks are counted by :mod:`cir_plugins.metrics`'s own
functions over the local slice (global row numbers, the target's score contributed by its owner),
and the counts are all-reduced; subset ranks reuse ``metrics._subset_ranks`` with owner-scored rows.
Top-k: local top-k per shard, all-gather, merge with the metrics' (score, row) keys.

All collectives use ``group`` (default: the world); the process group must be initialised.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import checks as C
from .. import metrics as M
from ..errors import CIRPluginsError, ConfigError, ShapeError, explain
from .loss import BankStats, sharded_loss, select_path, validate_loss_inputs

logger = logging.getLogger(__name__)

__all__ = [
    "shard_rows",
    "sharded_bank_contrastive_loss",
    "sharded_retrieval_metrics",
    "sharded_topk",
]


# --------------------------------------------------------------------------------------------
# sharding
# --------------------------------------------------------------------------------------------


def shard_rows(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows ``[start, stop)`` of an ``n``-row bank held by ``rank`` out of ``world``.

    Contiguous, balanced: the first ``n % world`` ranks hold one extra row. Ranks beyond ``n``
    hold an empty slice.
    """
    for name, value in (("n", n), ("rank", rank), ("world", world)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(explain(f"{name} must be an int", got=type(value).__name__, fix="pass ints"))
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ConfigError(explain("shard_rows needs n >= 0, world >= 1 and 0 <= rank < world",
                                  got=f"n={n}, rank={rank}, world={world}",
                                  fix="pass torch.distributed.get_rank() and get_world_size()"))
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _require_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(explain("torch.distributed is not initialised",
                                  fix="call torch.distributed.init_process_group (torchrun sets the environment), "
                                  "or use bank_contrastive_loss / retrieval_metrics in a single process"))
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_sizes(values, group, world, device):
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return torch.stack(everyone).cpu().tolist()  # (world, len(values))


def _check_layout(query, local, row_offset, n_total, group, checks):
    """Run this rank's input ``checks`` (a callable returning this rank's K of exclude_rows, or None),
    then gather (row_offset, n_local, n_total, B, failed, K) of every rank and check that the shards
    tile [0, n_total).

    Every rank reaches the exchange even when its own inputs are refused, so a bad input on one
    rank is an error on all of them instead of a wait for a collective that never comes.
    Returns (rank, world, batch sizes per rank, the largest K of any rank).
    """
    rank, world = _require_group(group)
    error, k = None, 0
    try:
        k = checks() or 0
        if not isinstance(row_offset, int) or not isinstance(n_total, int):
            raise ConfigError(explain("row_offset and n_total must be ints", got=(row_offset, n_total),
                                      fix="pass the shard's first global row and the whole bank's size"))
    except CIRPluginsError as exc:
        error = exc
    device = local.device if isinstance(local, torch.Tensor) else torch.device("cpu")
    mine = [0, 0, 0, 0, 1, 0] if error else [row_offset, local.shape[0], n_total, query.shape[0], 0, k]
    table = _gather_sizes(mine, group, world, device)
    if error is not None:
        raise error
    refused = [r for r, row in enumerate(table) if row[4]]
    if refused:
        raise ConfigError(explain(f"rank(s) {refused} refused their inputs to this collective call",
                                  fix="see the error raised on those ranks"))
    if any(r[2] != n_total for r in table):
        raise ConfigError(explain("ranks disagree on n_total", got=[r[2] for r in table], fix="pass the full bank size"))
    fix = "give rank r the rows shard_rows(n_total, r, world)"
    expected_start = 0
    for off, n, *_ in sorted(table, key=lambda r: r[0]):
        if off != expected_start:
            raise ConfigError(explain("the bank shards do not tile the rows [0, n_total) without gaps or overlaps",
                                      got=[(r[0], r[0] + r[1]) for r in table],
                                      expected="contiguous slices from shard_rows(n_total, rank, world)", fix=fix))
        expected_start = off + n
    if expected_start != n_total:
        raise ConfigError(explain("the bank shards do not cover n_total rows", got=expected_start,
                                  expected=n_total, fix=fix))
    return rank, world, [r[3] for r in table], max(r[5] for r in table)


def _local_rows(rows: torch.Tensor, row_offset: int, n_local: int) -> torch.Tensor:
    """Global rows -> rows of this shard, -1 where the row lives elsewhere (or is padding)."""
    local = rows - row_offset
    return torch.where((rows >= 0) & (local >= 0) & (local < n_local), local, torch.full_like(rows, -1))


# --------------------------------------------------------------------------------------------
# the sharded loss
# --------------------------------------------------------------------------------------------


class _Shard:
    """What the loss core needs to run over a sharded bank: gather every rank's queries and rows,
    and combine the per-shard statistics across ranks (the same merge as for chunks)."""

    def __init__(self, group, rank, sizes, row_offset, n_local, k):
        self.group, self.rank, self.sizes, self.k = group, rank, sizes, k  # k: the largest K of any rank
        self.row_offset, self.n_local = row_offset, n_local
        self.bmax = max(sizes)

    def _gather(self, x, fill):
        """(b, ...) -> (world * bmax, ...): every rank's rows, padded to bmax each."""
        pad = torch.full((self.bmax - x.shape[0], *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad]).contiguous()
        parts = [torch.empty_like(x) for _ in self.sizes]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts)

    def gather(self, query, target_rows, exclude_rows):
        """All ranks' queries (world * bmax, D) with their target / excluded rows made local (-1 elsewhere)."""
        k = self.k  # ranks may pass different K; the layout exchange brought the largest
        excl = None
        if k:
            ex = exclude_rows if exclude_rows is not None else target_rows.new_empty(query.shape[0], 0)
            ex = torch.cat([ex, ex.new_full((ex.shape[0], k - ex.shape[1]), -1)], 1)
            excl = _local_rows(self._gather(ex, -1), self.row_offset, self.n_local)
        rows = _local_rows(self._gather(target_rows, -1), self.row_offset, self.n_local)
        return self._gather(query, 0), rows, excl

    def combine(self, stats: BankStats, s_y, g_y):
        """Global statistics of this rank's queries: all-reduce of the max, then of the rescaled sums
        with the owners' target terms (zeros on the other ranks)."""
        m = stats.m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        r = stats.rescaled(m)
        dim = r.w.shape[1]
        packed = torch.cat([r.z[:, None], r.t[:, None], s_y[:, None], r.w, g_y], 1)  # (world * bmax, 3 + 2D)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        mine = packed[self.rank * self.bmax: self.rank * self.bmax + self.sizes[self.rank]]
        m = m[self.rank * self.bmax: self.rank * self.bmax + self.sizes[self.rank]]
        return BankStats(m, mine[:, 0], mine[:, 1], mine[:, 3:3 + dim]), mine[:, 2], mine[:, 3 + dim:]


def sharded_bank_contrastive_loss(
    query: torch.Tensor,
    local_bank: torch.Tensor,
    row_offset: int,
    n_total: int,
    target_rows: torch.Tensor,
    temperature,
    *,
    exclude_rows: Optional[torch.Tensor] = None,
    similarity: str = "dot",
    group=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Bank loss of this rank's queries against a bank sharded across the ranks of ``group``.

    Args:
        query: (B, D) float, this rank's queries (B may differ between ranks).
        local_bank: this rank's rows ``[row_offset, row_offset + n_local)`` of the bank:
            (n_local, D) for "dot", (n_local, T, D) for "max_token". Never receives a gradient.
        row_offset: global row of ``local_bank[0]`` (``shard_rows(n_total, rank, world)[0]``).
        n_total: rows of the whole bank; the shards of all ranks must tile ``[0, n_total)``.
        target_rows: (B,) int64 *global* row of each query's positive.
        temperature: float or 0-dim tensor (may require grad), > 0.
        exclude_rows: (B, K) int64 *global* rows removed from query i's softmax, -1 padded.
        similarity: "dot" or "max_token".
        group: process group (None: the default world).
        chunk_size: bank rows per chunk of the torch backend (giving it forces that backend).

    Returns:
        0-dim float32 (float64 for a float64 query): the mean over this rank's queries of
        ``logsumexp_j(s_ij / tau) - s_iy / tau`` over the *whole* bank, differentiable in
        ``query`` and ``temperature``. Every rank must call it (it runs collectives).
    """
    holder = {}

    def checks():
        C.check_chunk_size(chunk_size)
        probe = local_bank if local_bank.shape[0] else local_bank.new_zeros(1, *local_bank.shape[1:])  # layout only
        holder["tau"] = validate_loss_inputs(query, probe, target_rows, temperature, exclude_rows, similarity,
                                             n_rows=n_total)
        return 0 if exclude_rows is None else exclude_rows.shape[1]

    rank, _, sizes, k = _check_layout(query, local_bank, row_offset, n_total, group, checks)
    tau, empty = holder["tau"], local_bank.shape[0] == 0
    shard = _Shard(group, rank, sizes, row_offset, local_bank.shape[0], k)
    backend = "triton" if not empty and select_path(query, local_bank, similarity, chunk_size) == "fused" else "torch"
    return sharded_loss(query, tau, local_bank.detach(), target_rows, exclude_rows, similarity, backend=backend,
                        chunk_size=chunk_size, shard=shard)


# --------------------------------------------------------------------------------------------
# sharded retrieval
# --------------------------------------------------------------------------------------------


def _owner_scores(query, local, rows, row_offset, group, similarity, bf16=False):
    """Score of query i with global rows[i, j], contributed by the owning rank (all-reduced).

    rows (Q, S) int64 global, -1 padded -> (Q, S) float32 (0 at padding); the metrics' own scoring.
    """
    loc = _local_rows(rows, row_offset, local.shape[0])
    out = torch.zeros(rows.shape, dtype=torch.float32, device=query.device)
    if local.shape[0]:
        out = torch.where(loc >= 0, M._scores_of_rows(query, local, loc.clamp_min(0), similarity, bf16), out)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)  # exactly one owner adds its value to zeros
    return out


def _check_sharded_retrieval(query, local, row_offset, n_total, similarity, group, rows, chunk_size=None):
    """Validators of the metrics, layout of the shards, and the same queries on every rank."""
    def checks():
        C.check_chunk_size(chunk_size)
        probe = local if local.shape[0] else local.new_zeros(1, *local.shape[1:])  # layout only
        found = C.check_embeddings(query, probe, similarity, what="local_gallery")
        for name, value in rows.items():
            found += C.check_rows(name, value, query.shape[0], n_total, query.device, padded=name != "target_rows")
        if "target_rows" in rows:
            found += C.check_not_excluded(rows["target_rows"], rows.get("exclude_rows"))
        C.settle(found)

    _, world, sizes, _ = _check_layout(query, local, row_offset, n_total, group, checks)
    if len(set(sizes)) != 1:
        raise ShapeError(explain("sharded retrieval needs the same queries on every rank", got=f"query counts {sizes}",
                                 fix="give every rank all the queries; only the gallery is sharded"))
    return world


def sharded_retrieval_metrics(
    query: torch.Tensor,
    local_gallery: torch.Tensor,
    row_offset: int,
    n_total: int,
    target_rows: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10, 50),
    exclude_rows: Optional[torch.Tensor] = None,
    subset_rows: Optional[torch.Tensor] = None,
    subset_ks: Sequence[int] = (1, 2, 3),
    similarity: str = "dot",
    group=None,
    chunk_size: Optional[int] = None,
) -> Dict[str, float]:
    """:func:`cir_plugins.metrics.retrieval_metrics` with the gallery sharded across ranks.

    Every rank passes the same ``query`` (Q, D), ``target_rows`` (Q,), ``exclude_rows`` (Q, K)
    and ``subset_rows`` (Q, S) (all *global* rows, -1 padded), and its own slice
    ``local_gallery`` = rows ``[row_offset, row_offset + n_local)`` of the gallery ((n_local, D)
    or (n_local, T, D)). Returns the same dict on every rank: "R@k" and, with ``subset_rows``,
    "Rs@k" and "Rmean" = (R@5 + Rs@1) / 2, in percent; same ranking rule as the single-process
    metrics (ties go to the lower global row).
    """
    ks = C.check_ks("ks", ks)
    subset_ks = C.check_ks("subset_ks", subset_ks)
    _check_sharded_retrieval(query, local_gallery, row_offset, n_total, similarity, group,
                             {"target_rows": target_rows, "exclude_rows": exclude_rows, "subset_rows": subset_rows},
                             chunk_size)
    bf16 = M._use_bf16_scoring(query, local_gallery)
    target_score = _owner_scores(query, local_gallery, target_rows[:, None], row_offset, group, similarity, bf16)[:, 0]
    ranks = M._target_ranks(query, local_gallery, target_rows, exclude_rows, chunk_size, similarity, False,
                            row_offset=row_offset, target_score=target_score)
    dist.all_reduce(ranks, op=dist.ReduceOp.SUM, group=group)
    s_ranks = None
    if subset_rows is not None:
        s_ranks = M._subset_ranks(target_rows, subset_rows, exclude_rows,
                                  lambda rows: _owner_scores(query, local_gallery, rows, row_offset, group, similarity))
    return M.recall_table(ranks, ks, s_ranks, subset_ks)


def sharded_topk(
    query: torch.Tensor,
    local_gallery: torch.Tensor,
    row_offset: int,
    n_total: int,
    k: int,
    *,
    exclude_rows: Optional[torch.Tensor] = None,
    similarity: str = "dot",
    group=None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best *global* gallery rows per query with the gallery sharded across ranks.

    Same queries on every rank. Local top-k (:func:`cir_plugins.metrics.topk_rows`) per shard,
    all-gather of the (Q, k) candidates, merge by the metrics' (score desc, row asc) keys.
    Returns (scores (Q, k) float32, rows (Q, k) int64), identical on every rank; missing entries
    (fewer than k admissible rows) are score -inf and row -1.
    """
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_total:
        raise ConfigError(explain("k must be a positive int no larger than the gallery", got=k,
                                  expected=f"1..{n_total}", fix="ask for at most as many rows as the gallery has"))
    world = _check_sharded_retrieval(query, local_gallery, row_offset, n_total, similarity, group,
                                     {"exclude_rows": exclude_rows})
    n_q, n_local = query.shape[0], local_gallery.shape[0]
    scores = torch.full((n_q, k), float("-inf"), dtype=torch.float32, device=query.device)
    rows = torch.full((n_q, k), -1, dtype=torch.int64, device=query.device)
    k_local = min(k, n_local)
    if k_local:
        ex_local = _local_rows(exclude_rows, row_offset, n_local) if exclude_rows is not None else None
        s, r = M.topk_rows(query, local_gallery, k_local, exclude_rows=ex_local, chunk_size=chunk_size,
                           similarity=similarity)
        scores[:, :k_local] = s
        rows[:, :k_local] = torch.where(r >= 0, r + row_offset, r)
    all_s = [torch.empty_like(scores) for _ in range(world)]
    all_r = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_s, scores, group=group)
    dist.all_gather(all_r, rows, group=group)
    cand_s, cand_r = torch.cat(all_s, 1), torch.cat(all_r, 1)  # (Q, world * k)
    missing = cand_r < 0
    lowest = torch.iinfo(torch.int64).min
    keys = M._order_keys(cand_s.masked_fill(missing, 0.0), cand_r.clamp_min(0)).masked_fill_(missing, lowest)
    best = keys.topk(k, dim=1).values  # (Q, k) keys are distinct per row, best first
    out_s, out_r = M._decode_keys(best)
    gone = best == lowest
    return out_s.masked_fill(gone, float("-inf")), out_r.masked_fill(gone, -1)
