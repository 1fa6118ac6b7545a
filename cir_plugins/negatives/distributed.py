"""Multi-GPU (or multi-process) bank loss and retrieval with the bank sharded across ranks.

Under ``torchrun`` each rank holds a contiguous slice of the bank / gallery rows,
``[row_offset, row_offset + n_local)`` with ``shard_rows(n_total, rank, world)``. Nothing here
ever gathers the bank itself; only per-query statistics travel.

Loss (:func:`sharded_bank_contrastive_loss`). Every rank brings its own queries (data-parallel
training). The queries of all ranks are all-gathered (B_total x D, small), every rank computes
for all of them the softmax statistics over its shard (running max ``m``, ``z = sum exp(l - m)``,
``t = sum exp(l - m) s`` and ``w = sum exp(l - m) b``; see :mod:`cir_plugins.negatives.fused`), then
a distributed logsumexp combines them: one all-reduce of the max, one all-reduce of the rescaled
sums together with the target logit and target vector contributed by the rank that owns each
target row. Every rank then holds, for its own queries, the exact global ``logsumexp``,
``E_p[b]`` and ``E_p[s]``, so the backward (``dq = (E_p[b] - b_y) / tau``,
``dtau = (s_y - E_p[s]) / tau^2``) is local: it needs no collective of its own, because each
query's loss term lives on exactly one rank and the statistics it depends on were already reduced
in the forward. The returned loss is the mean over this rank's queries, equal (to rounding) to
``bank_contrastive_loss`` of these queries against the full bank; with equal batch sizes the
usual DDP gradient averaging then gives the gradient of the global mean.

Retrieval (:func:`sharded_retrieval_metrics`, :func:`sharded_topk`). Every rank brings the same
queries and a shard of the gallery. Recall is computed by counting, exactly as
:mod:`cir_plugins.metrics` does (rank = candidates with a higher score, or an equal score and a
lower row): the owner of each target row contributes its score (all-reduce), each rank counts
the candidates that beat it in its shard, and the counts are all-reduced. Top-k: local top-k per
shard, all-gather, merge with the same tie rule.

All collectives use ``group`` (default: the world); the process group must be initialised.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..errors import ConfigError, DeviceError, DTypeError, ShapeError, explain

logger = logging.getLogger(__name__)

__all__ = [
    "shard_rows",
    "sharded_bank_contrastive_loss",
    "sharded_retrieval_metrics",
    "sharded_topk",
    "local_bank_stats",
]

_SIMILARITIES = ("dot", "max_token")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_EMPTY_MAX = -1.0e30  # running max of a shard with no admissible row; exp(_EMPTY_MAX - M) == 0
# (queries x chunk rows x tokens) float32 elements of one score block in the chunked path
_CHUNK_BUDGET_ELEMENTS = 8 << 20


# --------------------------------------------------------------------------------------------
# sharding and validation
# --------------------------------------------------------------------------------------------


def shard_rows(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows ``[start, stop)`` of an ``n``-row bank held by ``rank`` out of ``world``.

    Contiguous, balanced: the first ``n % world`` ranks hold one extra row. Ranks beyond ``n``
    hold an empty slice.
    """
    for name, value in (("n", n), ("rank", rank), ("world", world)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(explain(f"{name} must be an int", got=type(value).__name__))
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ConfigError(
            explain(
                "shard_rows needs n >= 0, world >= 1 and 0 <= rank < world",
                got=f"n={n}, rank={rank}, world={world}",
                fix="pass torch.distributed.get_rank() and get_world_size()",
            )
        )
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _require_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            explain(
                "torch.distributed is not initialised",
                fix="call torch.distributed.init_process_group (torchrun sets the environment), "
                "or use bank_contrastive_loss / retrieval_metrics in a single process",
            )
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _as_temperature(temperature, device, dtype) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ShapeError(explain("temperature must be a scalar", got=tuple(temperature.shape), expected="()"))
        tau = temperature.reshape(())
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        tau = torch.tensor(float(temperature), device=device, dtype=dtype)
    else:
        raise ConfigError(explain("temperature must be a float or a 0-dim tensor", got=type(temperature).__name__))
    if not bool(tau.detach() > 0) or not bool(torch.isfinite(tau.detach())):
        raise ConfigError(explain("temperature must be finite and > 0", got=float(tau.detach()), fix="use e.g. 0.02"))
    return tau


def _check_embeddings(query, local, similarity, what):
    if similarity not in _SIMILARITIES:
        raise ConfigError(explain("unknown similarity", got=similarity, expected=" or ".join(_SIMILARITIES)))
    for name, t in (("query", query), (what, local)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(explain(f"{name} must be a tensor", got=type(t).__name__))
        if t.dtype not in _FLOAT_DTYPES:
            raise DTypeError(explain(f"{name} must be a float tensor", got=t.dtype, expected="float32/bf16/fp16/fp64"))
    want = 2 if similarity == "dot" else 3
    if query.dim() != 2 or local.dim() != want or (local.shape[-1] != query.shape[-1]):
        layout = "(n_local, D)" if similarity == "dot" else "(n_local, T, D)"
        raise ShapeError(
            explain(
                f"query must be (B, D) and the local {what} {layout} with the same D",
                got=f"query {tuple(query.shape)}, {what} {tuple(local.shape)}",
                fix="pass this rank's slice of the rows, e.g. full[start:stop] with shard_rows",
            )
        )
    if query.device != local.device:
        raise DeviceError(explain(f"query and {what} must share a device", got=(query.device, local.device)))


def _check_rows(name, rows, n_queries, n_total, device, padded):
    if rows is None:
        return
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64:
        raise DTypeError(explain(f"{name} must be an int64 tensor", got=getattr(rows, "dtype", type(rows).__name__)))
    want_dim = 2 if padded else 1
    if rows.dim() != want_dim or rows.shape[0] != n_queries:
        raise ShapeError(
            explain(f"{name} has the wrong shape", got=tuple(rows.shape), expected=f"({n_queries}{', K' if padded else ''})")
        )
    if rows.device != device:
        raise DeviceError(explain(f"{name} must be on the query's device", got=rows.device, expected=device))
    low = -1 if padded else 0
    if rows.numel() and (int(rows.min()) < low or int(rows.max()) >= n_total):
        raise ConfigError(
            explain(
                f"{name} holds rows outside the bank",
                got=f"min {int(rows.min())}, max {int(rows.max())}",
                expected=f"global rows in [{low}, {n_total})",
                fix="use global row numbers (row_of in the full bank), -1 for padding",
            )
        )


def _check_layout(query, n_local, row_offset, n_total, group, device):
    """Gather (row_offset, n_local, n_total, B) of every rank; check the shards tile [0, n_total).

    Returns the list of batch sizes per rank.
    """
    rank, world = _require_group(group)
    if not isinstance(row_offset, int) or not isinstance(n_total, int):
        raise ConfigError(explain("row_offset and n_total must be ints", got=(row_offset, n_total)))
    mine = torch.tensor([row_offset, n_local, n_total, query.shape[0]], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).cpu().tolist()  # (world, 4)
    if any(r[2] != n_total for r in table):
        raise ConfigError(explain("ranks disagree on n_total", got=[r[2] for r in table], fix="pass the full bank size"))
    expected_start = 0
    for r, (off, n, _, _) in sorted(enumerate(table), key=lambda kv: (kv[1][0], kv[0])):
        if off != expected_start:
            raise ConfigError(
                explain(
                    "the bank shards do not tile the rows [0, n_total) without gaps or overlaps",
                    got=[(o, o + k) for o, k, _, _ in table],
                    expected="contiguous slices from shard_rows(n_total, rank, world)",
                    fix="give rank r the rows shard_rows(n_total, r, world)",
                )
            )
        expected_start = off + n
    if expected_start != n_total:
        raise ConfigError(
            explain("the bank shards do not cover n_total rows", got=expected_start, expected=n_total,
                    fix="give rank r the rows shard_rows(n_total, r, world)")
        )
    return rank, world, [r[3] for r in table]


def _local_rows(rows: torch.Tensor, row_offset: int, n_local: int) -> torch.Tensor:
    """Global rows -> rows of this shard, -1 where the row lives elsewhere (or is padding)."""
    local = rows - row_offset
    return torch.where((rows >= 0) & (local >= 0) & (local < n_local), local, torch.full_like(rows, -1))


def _chunk_exclusions(exclude_local: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """(Q, width) bool mask of the excluded rows inside the chunk [start, start + width).

    exclude_local (Q, K) local rows, -1 = none. Built with a scatter (no host sync, unlike
    ``nonzero``), into one spare column that collects every out-of-chunk entry.
    """
    col = exclude_local - start  # (Q, K) column inside the chunk
    inside = (exclude_local >= 0) & (col >= 0) & (col < width)
    col = torch.where(inside, col, torch.full_like(col, width))  # out of chunk -> the spare column
    mask = torch.zeros(exclude_local.shape[0], width + 1, dtype=torch.bool, device=exclude_local.device)
    mask.scatter_(1, col, True)
    return mask[:, :width]


# --------------------------------------------------------------------------------------------
# local softmax statistics
# --------------------------------------------------------------------------------------------


def local_bank_stats(
    query: torch.Tensor,
    local_bank: torch.Tensor,
    temperature: torch.Tensor,
    exclude_local: Optional[torch.Tensor],
    similarity: str,
    *,
    chunk_size: Optional[int] = None,
    use_fused: Optional[bool] = None,
):
    """Softmax statistics of ``sim(query, local_bank) / tau`` over this shard, per query.

    Args:
        query: (Bq, D) float, any grad is ignored.
        local_bank: (n, D) or (n, T, D).
        temperature: 0-dim tensor.
        exclude_local: (Bq, K) int64 rows of this shard to leave out, -1 = none; or None.
        similarity: "dot" or "max_token" (score = max over the T tokens).
        chunk_size: bank rows per chunk of the PyTorch path (None: from a fixed element budget).
        use_fused: force (True) or forbid (False) the Triton kernel; None: use it when available.

    Returns:
        (m, z, t, w) in float32 (float64 for a float64 query): m (Bq,) max logit (-1e30 if none),
        z (Bq,) sum exp(l - m), t (Bq,) sum exp(l - m) * s, w (Bq, D) sum exp(l - m) * g where g
        is the bank row (dot) or its best-matching token (max_token).
    """
    cdtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.detach().to(cdtype)
    bq, dim = q.shape
    n = local_bank.shape[0]
    tau = temperature.detach().to(cdtype)
    if use_fused is None:
        use_fused = False
        if cdtype == torch.float32 and n > 0:
            from . import fused  # noqa: PLC0415 - triton is optional

            use_fused = fused.fused_available(query, local_bank, similarity)
    if use_fused:
        from . import fused  # noqa: PLC0415

        st = fused.fused_dot_bank_partials(query.detach(), local_bank, tau.float(), exclude_local, need_w=True)
        return st.m, st.z, st.t, st.w

    m = torch.full((bq,), _EMPTY_MAX, dtype=cdtype, device=q.device)
    z = torch.zeros(bq, dtype=cdtype, device=q.device)
    t = torch.zeros(bq, dtype=cdtype, device=q.device)
    w = torch.zeros(bq, dim, dtype=cdtype, device=q.device)
    tokens = local_bank.shape[1] if similarity == "max_token" else 1
    step = chunk_size or max(16, _CHUNK_BUDGET_ELEMENTS // max(1, bq * tokens))
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk = local_bank[start:stop].detach().to(cdtype)  # (C, D) or (C, T, D)
        c = stop - start
        if similarity == "dot":
            s = q @ chunk.T  # (Bq, D) @ (D, C) -> (Bq, C)
        else:
            tk = chunk.shape[1]
            tok = (q @ chunk.reshape(c * tk, dim).T).view(bq, c, tk)  # (Bq, C*T) -> (Bq, C, T)
            s, arg = tok.max(dim=2)  # (Bq, C) best token score and its index
        logits = s / tau
        if exclude_local is not None:
            logits = logits.masked_fill(_chunk_exclusions(exclude_local, start, c), float("-inf"))
        m_new = torch.maximum(m, logits.max(dim=1).values)
        alpha = torch.exp(m - m_new)  # (Bq,) rescales the running sums
        p = torch.exp(logits - m_new[:, None])  # (Bq, C), 0 where excluded
        z = z * alpha + p.sum(1)
        t = t * alpha + (p * s).sum(1)
        if similarity == "dot":
            w = w * alpha[:, None] + p @ chunk  # (Bq, C) @ (C, D) -> (Bq, D)
        else:
            # weight only each row's winning token: (Bq, C, T) one-hot weights, then
            # (Bq, C*T) @ (C*T, D) -> (Bq, D); vectorised over the batch
            weights = torch.zeros_like(tok).scatter_(2, arg[:, :, None], p[:, :, None])
            w = w * alpha[:, None] + weights.reshape(bq, c * tk) @ chunk.reshape(c * tk, dim)
        m = m_new
    return m, z, t, w


def _owned_targets(query, local_bank, target_local, similarity, cdtype):
    """Score and gradient vector of each query's target, zero where another rank owns it.

    query (Bq, D); target_local (Bq,) with -1 for rows held elsewhere. Returns s_y (Bq,), g_y (Bq, D).
    """
    bq, dim = query.shape
    s_y = torch.zeros(bq, dtype=cdtype, device=query.device)
    g_y = torch.zeros(bq, dim, dtype=cdtype, device=query.device)
    own = (target_local >= 0).nonzero().flatten()
    if own.numel():
        q = query.detach()[own].to(cdtype)  # (O, D)
        rows = local_bank[target_local[own]].detach().to(cdtype)  # (O, D) or (O, T, D)
        if similarity == "dot":
            s_y[own] = (q * rows).sum(-1)
            g_y[own] = rows
        else:
            tok = torch.einsum("od,otd->ot", q, rows)  # (O, T)
            best, arg = tok.max(dim=1)
            s_y[own] = best
            g_y[own] = rows[torch.arange(own.numel(), device=rows.device), arg]  # (O, D) winning tokens
    return s_y, g_y


# --------------------------------------------------------------------------------------------
# the sharded loss
# --------------------------------------------------------------------------------------------


class _ShardedBankLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, tau, local_bank, row_offset, target_rows, exclude_rows, similarity, group,
                rank, sizes, chunk_size):
        cdtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        world = len(sizes)
        bmax = max(sizes)
        bsz, dim = query.shape
        n_local = local_bank.shape[0]
        dev = query.device

        # all ranks' queries, targets and exclusions, padded to bmax rows each: (world * bmax, ...)
        def gather(x, fill):
            pad = torch.full((bmax - x.shape[0], *x.shape[1:]), fill, dtype=x.dtype, device=dev)
            x = torch.cat([x, pad]).contiguous()
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x, group=group)
            return torch.cat(parts)

        q_all = gather(query.detach().to(cdtype), 0)  # (world * bmax, D)
        t_all = gather(target_rows, -1)  # (world * bmax,)
        k = exclude_rows.shape[1] if exclude_rows is not None else 0
        # ranks may pass different K: agree on the largest
        k_t = torch.tensor([k], dtype=torch.int64, device=dev)
        dist.all_reduce(k_t, op=dist.ReduceOp.MAX, group=group)
        k_max = int(k_t)
        e_all = None
        if k_max:
            ex = exclude_rows if exclude_rows is not None else torch.empty(bsz, 0, dtype=torch.int64, device=dev)
            ex = torch.cat([ex, torch.full((bsz, k_max - ex.shape[1]), -1, dtype=torch.int64, device=dev)], 1)
            e_all = _local_rows(gather(ex, -1), row_offset, n_local)  # (world * bmax, K_max) local rows

        m, z, t, w = local_bank_stats(q_all, local_bank, tau, e_all, similarity, chunk_size=chunk_size)
        m, z, t, w = m.to(cdtype), z.to(cdtype), t.to(cdtype), w.to(cdtype)
        s_y, g_y = _owned_targets(q_all, local_bank, _local_rows(t_all, row_offset, n_local), similarity, cdtype)

        # distributed logsumexp: global max, then the rescaled sums and the owners' target terms
        m_glob = m.clone()
        dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(m - m_glob)  # (world * bmax,)
        packed = torch.cat([(z * scale)[:, None], (t * scale)[:, None], s_y[:, None], w * scale[:, None], g_y], 1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)  # (world * bmax, 3 + 2D)

        mine = slice(rank * bmax, rank * bmax + bsz)
        z_g, t_g, sy_g = packed[mine, 0], packed[mine, 1], packed[mine, 2]
        w_g, gy_g = packed[mine, 3 : 3 + dim], packed[mine, 3 + dim :]
        tau_c = tau.detach().to(cdtype)
        per_query = m_glob[mine] + torch.log(z_g) - sy_g / tau_c  # (B,) logsumexp - target logit
        ctx.save_for_backward(w_g / z_g[:, None], gy_g, t_g / z_g, sy_g, tau_c)
        ctx.query_dtype = query.dtype
        ctx.tau_shape = tau.shape
        ctx.tau_dtype = tau.dtype
        return per_query.mean()

    @staticmethod
    def backward(ctx, grad_out):
        exp_b, g_y, exp_s, s_y, tau = ctx.saved_tensors
        g = grad_out.to(tau.dtype) / exp_b.shape[0]
        grad_q = grad_tau = None
        if ctx.needs_input_grad[0]:
            grad_q = ((exp_b - g_y) * (g / tau)).to(ctx.query_dtype)  # (B, D)
        if ctx.needs_input_grad[1]:
            grad_tau = (g * (s_y - exp_s).sum() / (tau * tau)).reshape(ctx.tau_shape).to(ctx.tau_dtype)
        return grad_q, grad_tau, None, None, None, None, None, None, None, None, None


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
        chunk_size: bank rows per chunk of the PyTorch path.

    Returns:
        0-dim float32 (float64 for a float64 query): the mean over this rank's queries of
        ``logsumexp_j(s_ij / tau) - s_iy / tau`` over the *whole* bank, differentiable in
        ``query`` and ``temperature``. Every rank must call it (it runs collectives).
    """
    _check_embeddings(query, local_bank, similarity, "local_bank")
    if query.shape[0] == 0:
        raise ShapeError(explain("query must hold at least one row", got=tuple(query.shape)))
    cdtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    tau = _as_temperature(temperature, query.device, cdtype)
    if tau.device != query.device:
        raise DeviceError(explain("temperature must be on the query's device", got=tau.device, expected=query.device))
    _check_rows("target_rows", target_rows, query.shape[0], n_total, query.device, padded=False)
    _check_rows("exclude_rows", exclude_rows, query.shape[0], n_total, query.device, padded=True)
    if exclude_rows is not None and bool((exclude_rows == target_rows[:, None]).any()):
        bad = (exclude_rows == target_rows[:, None]).any(1).nonzero().flatten()[:5].tolist()
        raise ConfigError(
            explain("a query excludes its own target row", got=f"queries {bad}", fix="drop the target from exclude_rows")
        )
    rank, _, sizes = _check_layout(query, local_bank.shape[0], row_offset, n_total, group, query.device)
    return _ShardedBankLoss.apply(
        query, tau, local_bank.detach(), row_offset, target_rows, exclude_rows, similarity, group, rank, sizes,
        chunk_size,
    )


# --------------------------------------------------------------------------------------------
# sharded retrieval
# --------------------------------------------------------------------------------------------


def _score_rows(query, local, rows_local, similarity):
    """float32 scores of query i with local rows rows_local[i, j] (>= 0). (Q, S) -> (Q, S)."""
    q = query.float()
    g = local[rows_local].float()  # (Q, S, D) or (Q, S, T, D)
    if similarity == "dot":
        return torch.einsum("qd,qsd->qs", q, g)
    return torch.einsum("qd,qstd->qst", q, g).amax(dim=2)


def _owner_scores(query, local, rows, row_offset, group, similarity):
    """Score of query i with global rows[i, j], contributed by the owning rank (all-reduced).

    rows (Q, S) int64 global, -1 padded -> (Q, S) float32 (0 at padding).
    """
    loc = _local_rows(rows, row_offset, local.shape[0])
    out = torch.zeros(rows.shape, dtype=torch.float32, device=query.device)
    if local.shape[0]:
        sc = _score_rows(query, local, loc.clamp_min(0), similarity)
        out = torch.where(loc >= 0, sc, out)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)  # exactly one owner adds its value to zeros
    return out


def _sharded_target_ranks(query, local, row_offset, target_rows, exclude_rows, similarity, group, chunk_size):
    from ..metrics import score_chunk  # noqa: PLC0415 - same float32 scoring as single-process metrics

    n_q = query.shape[0]
    n_local = local.shape[0]
    target_score = _owner_scores(query, local, target_rows[:, None], row_offset, group, similarity)[:, 0]  # (Q,)
    tokens = local.shape[1] if similarity == "max_token" else 1
    step = chunk_size or max(16, _CHUNK_BUDGET_ELEMENTS // max(1, n_q * tokens))
    counts = torch.zeros(n_q, dtype=torch.int64, device=query.device)
    ex_local = _local_rows(exclude_rows, row_offset, n_local) if exclude_rows is not None else None
    for start in range(0, n_local, step):
        stop = min(start + step, n_local)
        scores = score_chunk(query, local[start:stop], similarity)  # (Q, C)
        rows = torch.arange(start + row_offset, stop + row_offset, device=query.device)  # (C,) global
        beats = (scores > target_score[:, None]) | (
            (scores == target_score[:, None]) & (rows[None, :] < target_rows[:, None])
        )
        beats &= rows[None, :] != target_rows[:, None]  # the target never beats itself
        if ex_local is not None:
            beats &= ~_chunk_exclusions(ex_local, start, stop - start)  # removed candidates are not counted
        counts += beats.sum(1)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def _sharded_subset_ranks(query, local, row_offset, target_rows, subset_rows, exclude_rows, similarity, group):
    rows, _ = subset_rows.sort(dim=1)  # (Q, S): padding first, duplicates adjacent
    valid = rows >= 0
    valid[:, 1:] &= rows[:, 1:] != rows[:, :-1]  # keep the first of each duplicate
    is_target = valid & (rows == target_rows[:, None])
    missing = ~is_target.any(1)
    if bool(missing.any()):
        bad = missing.nonzero().flatten()[:5].tolist()
        raise ConfigError(
            explain("a query's target is not among its subset rows", got=f"queries {bad}",
                    fix="include the target in subset_rows (CIRR: img_set members minus the reference)")
        )
    if exclude_rows is not None:
        valid &= ~(rows[:, :, None] == exclude_rows[:, None, :]).any(2)  # (Q, S, K) -> (Q, S)
    scores = _owner_scores(query, local, rows, row_offset, group, similarity)  # (Q, S)
    target_score = scores[is_target]  # (Q,)
    beats = (scores > target_score[:, None]) | ((scores == target_score[:, None]) & (rows < target_rows[:, None]))
    beats &= valid & ~is_target
    return beats.sum(1)


def _check_same_queries(query, group, world):
    mine = torch.tensor([query.shape[0]], dtype=torch.int64, device=query.device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    counts = [int(x) for x in everyone]
    if len(set(counts)) != 1:
        raise ShapeError(
            explain("sharded retrieval needs the same queries on every rank", got=f"query counts {counts}",
                    fix="give every rank all the queries; only the gallery is sharded")
        )


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
    _check_embeddings(query, local_gallery, similarity, "local_gallery")
    for name, values in (("ks", ks), ("subset_ks", subset_ks)):
        if not values or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in values):
            raise ConfigError(explain(f"{name} must be positive ints", got=values))
    n_q = query.shape[0]
    _check_rows("target_rows", target_rows, n_q, n_total, query.device, padded=False)
    _check_rows("exclude_rows", exclude_rows, n_q, n_total, query.device, padded=True)
    _check_rows("subset_rows", subset_rows, n_q, n_total, query.device, padded=True)
    if exclude_rows is not None and bool((exclude_rows == target_rows[:, None]).any()):
        raise ConfigError(explain("a query excludes its own target row", fix="drop the target from exclude_rows"))
    _, world, _ = _check_layout(query, local_gallery.shape[0], row_offset, n_total, group, query.device)
    _check_same_queries(query, group, world)
    ranks = _sharded_target_ranks(query, local_gallery, row_offset, target_rows, exclude_rows, similarity, group,
                                  chunk_size)
    out = {f"R@{k}": float((ranks < k).double().mean()) * 100.0 for k in ks}
    r5 = float((ranks < 5).double().mean()) * 100.0
    if subset_rows is not None:
        s_ranks = _sharded_subset_ranks(query, local_gallery, row_offset, target_rows, subset_rows, exclude_rows,
                                        similarity, group)
        out.update({f"Rs@{k}": float((s_ranks < k).double().mean()) * 100.0 for k in subset_ks})
        out["Rmean"] = (r5 + float((s_ranks < 1).double().mean()) * 100.0) / 2.0
    return out


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
    all-gather of the (Q, k) candidates, merge: score descending, ties to the lower global row.
    Returns (scores (Q, k) float32, rows (Q, k) int64), identical on every rank; missing entries
    (fewer than k admissible rows) are score -inf and row -1.
    """
    from ..metrics import topk_rows  # noqa: PLC0415

    _check_embeddings(query, local_gallery, similarity, "local_gallery")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_total:
        raise ConfigError(explain("k must be a positive int no larger than the gallery", got=k, expected=f"1..{n_total}"))
    _check_rows("exclude_rows", exclude_rows, query.shape[0], n_total, query.device, padded=True)
    _, world, _ = _check_layout(query, local_gallery.shape[0], row_offset, n_total, group, query.device)
    _check_same_queries(query, group, world)
    n_q, n_local = query.shape[0], local_gallery.shape[0]
    scores = torch.full((n_q, k), float("-inf"), dtype=torch.float32, device=query.device)
    rows = torch.full((n_q, k), -1, dtype=torch.int64, device=query.device)
    k_local = min(k, n_local)
    if k_local:
        ex_local = _local_rows(exclude_rows, row_offset, n_local) if exclude_rows is not None else None
        s, r = topk_rows(query, local_gallery, k_local, exclude_rows=ex_local, chunk_size=chunk_size,
                         similarity=similarity)
        scores[:, :k_local] = s
        rows[:, :k_local] = torch.where(r >= 0, r + row_offset, r)
    all_s = [torch.empty_like(scores) for _ in range(world)]
    all_r = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_s, scores, group=group)
    dist.all_gather(all_r, rows, group=group)
    cand_s = torch.cat(all_s, 1)  # (Q, world * k)
    cand_r = torch.cat(all_r, 1)
    # order by (score desc, row asc), missing last: sort by row first, then a stable sort by score
    sort_rows = torch.where(cand_r >= 0, cand_r, torch.full_like(cand_r, torch.iinfo(torch.int64).max))
    by_row = sort_rows.argsort(dim=1, stable=True)
    cand_s, cand_r = cand_s.gather(1, by_row), cand_r.gather(1, by_row)
    by_score = cand_s.argsort(dim=1, descending=True, stable=True)
    return cand_s.gather(1, by_score)[:, :k], cand_r.gather(1, by_score)[:, :k]
