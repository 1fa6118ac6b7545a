"""The stage-2 contrastive loss against a static bank of every gallery image: one streaming core.

For query ``q_i`` with positive bank row ``y_i`` the loss is

    L = mean_i [ logsumexp_j( s(q_i, b_j) / tau ) - s(q_i, b_{y_i}) / tau ]

over every bank row j that is not excluded for query i. ``s`` is the dot product (bank ``(N, D)``)
or the maximum over a target's tokens of the dot product (bank ``(N, T, D)``, ``"max_token"``).

Everything the loss and its gradients need is a softmax statistic over the bank (:class:`BankStats`):
the max logit ``m``, the normaliser ``z = sum exp(l - m)``, ``t = sum exp(l - m) s`` (so
``E_p[s] = t / z``) and ``w = sum exp(l - m) g`` with ``g`` the bank row (its winning token for
max_token; ``E_p[b] = w / z``). Then

    L_i = m_i + log z_i - s_iy / tau,   dL_i/dq_i = (E_p[b] - b_y) / tau,   dL_i/dtau = (s_iy - E_p[s]) / tau^2.

The code is arranged around that once:

* :func:`bank_stats` returns the statistics with one of two backends: ``"torch"`` (chunks of the
  bank, each chunk's statistics merged into the running ones by :meth:`BankStats.combine`, never
  holding ``B x N``) or ``"triton"`` (the kernel in :mod:`cir_plugins.negatives.fused`, whose
  per-split partials are merged by the same :meth:`BankStats.combine`).
* :class:`BankLoss` is the one autograd Function: statistics plus the target term in, mean loss
  out; its backward is the two formulas above.
* Sharding (:mod:`cir_plugins.negatives.distributed`) computes the same statistics over each
  rank's rows and combines them across ranks (all-reduce of the max and of the rescaled sums)
  before :class:`BankLoss`; :func:`bank_contrastive_loss` is that with one rank.

:func:`naive_bank_contrastive_loss` (full ``(B, N)`` logits, ``F.cross_entropy``, plain autograd) is
the reference every path is tested against.

Precision: statistics are accumulated in float32 (float64 for a float64 query); each bank chunk is
upcast before the products, so a bf16 / fp16 bank is accumulated in float32. The loss has that
compute dtype. Gradients flow to the query and the temperature, never to the bank. The Triton backend
takes a ``precision`` (:data:`PRECISIONS`): "exact" (float32-grade products over a half bank, the
default), "fast" and "two_pass" (the query rounded once to the bank's dtype; two_pass computes ``w``
in a second pass from bf16 softmax weights and one GEMM per bank chunk, see
:mod:`cir_plugins.negatives.fused`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError, NonFiniteError, explain
from ..checks import (SIMILARITIES, as_temperature, check_chunk_size, check_embeddings, check_not_excluded,
                      check_rows, settle)
from ..metrics import _mask_rows_

__all__ = [
    "bank_contrastive_loss",
    "naive_bank_contrastive_loss",
    "bank_stats",
    "BankStats",
    "BankLoss",
    "target_term",
    "select_path",
    "default_chunk_size",
    "validate_loss_inputs",
    "SIMILARITIES",
    "CHUNK_BUDGET_BYTES",
]

logger = logging.getLogger(__name__)

# Bytes of one chunk's (B, chunk, T) float32 score block in the torch backend; see
# benchmarks/RESULTS.md (bank loss on CPU) for how it was chosen.
CHUNK_BUDGET_BYTES = 16 << 20
_MIN_CHUNK = 64
# The running max of queries with no admissible row (yet): exp(EMPTY_MAX - m) == 0 for any real m.
EMPTY_MAX = -1.0e30
BACKENDS = ("auto", "torch", "triton")
# Products of the Triton backend over a half bank (cir_plugins.negatives.fused); the torch backend is float32.
PRECISIONS = ("exact", "fast", "two_pass")

Temperature = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------
# the statistics
# --------------------------------------------------------------------------------------------

@dataclass
class BankStats:
    """Softmax statistics of ``s / tau`` over (a part of) the bank, per query.

    Fields (B queries, D dims; a leading split dim S before :meth:`combine`), compute dtype:
        m: (B,) max logit (``EMPTY_MAX`` when no row is admissible).
        z: (B,) ``sum_j exp(l_j - m)``.
        t: (B,) ``sum_j exp(l_j - m) * s_j`` (raw similarities, not divided by tau), or None.
        w: (B, D) ``sum_j exp(l_j - m) * g_j``, or None when not requested.
    """

    m: torch.Tensor
    z: torch.Tensor
    t: Optional[torch.Tensor]
    w: Optional[torch.Tensor]

    def rescaled(self, m: torch.Tensor) -> "BankStats":
        """The same sums expressed relative to a larger max ``m`` (broadcastable to ``self.m``)."""
        scale = torch.exp(self.m - m)
        return BankStats(m.expand_as(self.m), self.z * scale, None if self.t is None else self.t * scale,
                         None if self.w is None else self.w * scale[..., None])

    def combine(self) -> "BankStats":
        """Merge the parts along the leading dim (chunks, kernel splits): (S, B) -> (B,)."""
        r = self.rescaled(self.m.amax(dim=0))
        return BankStats(r.m[0], r.z.sum(0), None if r.t is None else r.t.sum(0), None if r.w is None else r.w.sum(0))

    @staticmethod
    def stack(parts) -> "BankStats":
        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.stack(values)
        return BankStats(cat("m"), cat("z"), cat("t"), cat("w"))


def default_chunk_size(batch: int, tokens: int = 1, budget_bytes: Optional[int] = None) -> int:
    """Bank rows per chunk so that one (batch, chunk, tokens) float32 block fits ``budget_bytes``
    (default: the module's CHUNK_BUDGET_BYTES, read at call time)."""
    budget = CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(_MIN_CHUNK, budget // (4 * max(1, batch) * max(1, tokens)))


def _fused_module():
    """The optional Triton module, or None when it is not installed in this checkout."""
    try:
        from . import fused  # noqa: PLC0415 - optional, imported lazily
    except ModuleNotFoundError as exc:  # only the absence of that very module is tolerated
        if exc.name != f"{__package__}.fused":
            raise
        return None
    return fused


def select_path(query: torch.Tensor, bank: torch.Tensor, similarity: str = "dot",
                chunk_size: Optional[int] = None) -> str:
    """The backend :func:`bank_contrastive_loss` uses: "fused" (Triton) or "chunked" (torch).

    "fused" on CUDA when the Triton module is present and accepts the inputs, unless a
    ``chunk_size`` is given (that forces the chunked torch backend).
    """
    if chunk_size is None and query.is_cuda:
        fused = _fused_module()
        if fused is not None and fused.fused_available(query, bank, similarity):
            return "fused"
    return "chunked"


def _chunk_stats(q_tau, q, chunk, exclude_rows, start, similarity, need_w, buffer) -> BankStats:
    """Statistics of one bank chunk. q_tau = q / tau and q (B, D) compute dtype; chunk (C, D) or
    (C, T, D) upcast; ``buffer`` holds at least B * C * T elements, reused for the score block."""
    b, c = q.shape[0], chunk.shape[0]
    if similarity == "dot":
        logits = torch.mm(q_tau, chunk.T, out=buffer[:b * c].view(b, c))  # (B, D) @ (D, C) -> (B, C)
    else:
        t, d = chunk.shape[1], chunk.shape[2]
        token_logits = torch.mm(q_tau, chunk.reshape(c * t, d).T, out=buffer[:b * c * t].view(b, c * t))
        logits, arg = token_logits.view(b, c, t).max(dim=2)  # (B, C) best token and its index
    if exclude_rows is not None:
        _mask_rows_(logits, exclude_rows, start)  # excluded -> -inf
    m = logits.amax(dim=1).clamp_min(EMPTY_MAX)  # (B,); a NaN row stays NaN and surfaces in the loss
    weights = logits.sub_(m[:, None]).exp_()  # (B, C) in place, 0 where excluded
    w = t_sum = None
    if need_w:
        if similarity == "dot":
            w = weights @ chunk  # (B, C) @ (C, D) -> (B, D)
        else:  # each weight on its winning token: (B, C, T) reusing the score buffer, then one product
            spread = token_logits.view(b, c, t).zero_().scatter_(2, arg.unsqueeze(2), weights.unsqueeze(2))
            w = spread.view(b, c * t) @ chunk.reshape(c * t, d)  # (B, C*T) @ (C*T, D)
        t_sum = (w * q).sum(dim=1)  # sum_j p_j s_j = q . sum_j p_j g_j: no pass over the (B, C) block
    return BankStats(m, weights.sum(dim=1), t_sum, w)


def _bank_stats(q, bank, tau, exclude_rows, similarity, *, backend, chunk_size=None, need_t=True, need_w=True,
                precision="exact", query_dtype=None) -> BankStats:
    """:func:`bank_stats` on validated inputs. q (B, D) in the compute dtype, detached; ``query_dtype``
    the caller's (a half query goes to the kernel as it is, whose values need no hi/lo split)."""
    if backend == "triton":
        q_in = q.to(query_dtype) if query_dtype in (torch.bfloat16, torch.float16) else q  # exact: q came from it
        stats = _fused_module().bank_partials(q_in, bank, tau, exclude_rows, need_w=need_w, precision=precision)
        stats = BankStats(*(None if x is None else x.to(q.dtype) for x in (stats.m, stats.z, stats.t, stats.w)))
        return stats if need_t else BankStats(stats.m, stats.z, None, stats.w)
    tokens = bank.shape[1] if similarity == "max_token" else 1
    step = min(chunk_size or default_chunk_size(q.shape[0], tokens), max(1, bank.shape[0]))
    buffer = q.new_empty(q.shape[0] * step * tokens)
    q_tau = q / tau
    running = None
    for start in range(0, bank.shape[0], step):
        chunk = bank[start:start + step].to(q.dtype)  # (C, D) or (C, T, D)
        part = _chunk_stats(q_tau, q, chunk, exclude_rows, start, similarity, need_w or need_t, buffer)
        running = part if running is None else BankStats.stack([running, part]).combine()
    if running is None:  # an empty shard
        b, d = q.shape
        zeros = q.new_zeros(b)
        running = BankStats(torch.full_like(zeros, EMPTY_MAX), zeros, zeros.clone(), q.new_zeros(b, d))
    return running


def bank_stats(query: torch.Tensor, bank: torch.Tensor, temperature: Temperature,
               exclude_rows: Optional[torch.Tensor] = None, similarity: str = "dot", *, backend: str = "auto",
               chunk_size: Optional[int] = None, need_w: bool = True) -> BankStats:
    """Softmax statistics of ``sim(query, bank) / temperature`` per query, in one pass over the bank.

    query (B, D); bank (N, D) or (N, T, D); exclude_rows (B, K) int64, -1 padded, rows left out.
    ``backend``: "torch" (chunked), "triton" (CUDA) or "auto" (as :func:`select_path`). Returns
    :class:`BankStats` in float32 (float64 for a float64 query), without autograd history.
    """
    if backend not in BACKENDS:
        raise ConfigError(explain("unknown backend", got=backend, expected=BACKENDS, fix="use 'torch' or 'triton'"))
    check_chunk_size(chunk_size)
    checks = check_embeddings(query, bank, similarity, what="bank", finite_rows=False)
    checks += check_rows("exclude_rows", exclude_rows, query.shape[0], bank.shape[0], query.device, padded=True,
                         queries="B")
    tau, tau_checks = as_temperature(temperature, query)
    settle(checks + tau_checks)
    if backend == "auto":
        backend = "triton" if select_path(query, bank, similarity, chunk_size) == "fused" else "torch"
    cdtype = tau.dtype
    return _bank_stats(query.detach().to(cdtype), bank.detach(), tau.detach(), exclude_rows, similarity,
                       backend=backend, chunk_size=chunk_size, need_w=need_w)


def target_term(query: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, similarity: str):
    """s(q_i, b_{y_i}) (B,) and the bank vector it came from (B, D) (the winning token for max_token).

    query (B, D) compute dtype; rows (B,) rows of ``bank``, -1 where another shard owns the target:
    those get zeros (the owner contributes them when the shards are combined).
    """
    if bank.shape[0] == 0:  # an empty shard owns no target
        return query.new_zeros(query.shape[0]), torch.zeros_like(query)
    own = rows >= 0
    vecs = bank[rows.clamp_min(0)].to(query.dtype)  # (B, D) or (B, T, D)
    if similarity == "dot":
        scores = (query * vecs).sum(-1)
    else:
        token_scores = torch.einsum("bd,btd->bt", query, vecs)  # (B, T)
        scores, arg = token_scores.max(dim=1)
        vecs = vecs[torch.arange(vecs.shape[0], device=vecs.device), arg]  # (B, D)
    return torch.where(own, scores, 0.0), torch.where(own[:, None], vecs, 0.0)


# --------------------------------------------------------------------------------------------
# the one autograd Function
# --------------------------------------------------------------------------------------------

class BankLoss(torch.autograd.Function):
    """Statistics plus the target term -> mean loss; backward from the saved expectations.

    forward(query (B, D), tau 0-dim, m, z (B,), t (B,) or None, w (B, D) or None, s_y (B,), g_y (B, D))
    -> 0-dim mean of ``m + log z - s_y / tau``. Only ``query`` and ``tau`` receive gradients:
    ``(w / z - g_y) / tau / B`` and ``sum(s_y - t / z) / tau^2 / B`` (times the incoming gradient).
    """

    @staticmethod
    def forward(ctx, query, tau, m, z, t, w, s_y, g_y):
        per_query = m + torch.log(z) - s_y / tau  # (B,) logsumexp - target logit
        ctx.save_for_backward(tau, z, t, w, s_y, g_y)
        return per_query.mean()

    @staticmethod
    def backward(ctx, grad_out):
        tau, z, t, w, s_y, g_y = ctx.saved_tensors
        g = grad_out / z.shape[0]
        grad_q = grad_tau = None
        if ctx.needs_input_grad[0]:
            grad_q = (w / z[:, None] - g_y) * (g / tau)  # (B, D): (E_p[b] - b_y) / tau / B
        if ctx.needs_input_grad[1]:
            grad_tau = g * (s_y - t / z).sum() / (tau * tau)  # (s_y - E_p[s]) / tau^2 / B
        return grad_q, grad_tau, None, None, None, None, None, None


def _check_finite_loss(loss: torch.Tensor) -> None:
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteError(explain("the bank loss is not finite", got=float(loss.detach()),
                                     fix="check the bank for NaN/inf rows (rebuild it) and the temperature"))


def sharded_loss(query, tau, bank, target_rows, exclude_rows, similarity, *, backend, chunk_size=None,
                 precision="exact", shard=None) -> torch.Tensor:
    """The loss pipeline on validated inputs: statistics, target term, (shard combination), BankLoss.

    query (B, D); tau 0-dim compute dtype; ``shard`` None for one process, else the object of
    :mod:`cir_plugins.negatives.distributed` whose ``gather`` brings every rank's queries (and their
    rows, made local to this shard) and whose ``combine`` merges the statistics across ranks and
    keeps this rank's queries.
    """
    q = query.to(tau.dtype)
    need_w = shard is not None or (torch.is_grad_enabled() and q.requires_grad)
    need_t = shard is not None or (torch.is_grad_enabled() and tau.requires_grad)
    with torch.no_grad():
        q_all, rows, excl = q.detach(), target_rows, exclude_rows
        if shard is not None:
            q_all, rows, excl = shard.gather(q_all, target_rows, exclude_rows)
        stats = _bank_stats(q_all, bank, tau.detach(), excl, similarity, backend=backend, chunk_size=chunk_size,
                            need_t=need_t, need_w=need_w, precision=precision, query_dtype=query.dtype)
        s_y, g_y = target_term(q_all, bank, rows, similarity)
        if shard is not None:
            stats, s_y, g_y = shard.combine(stats, s_y, g_y)
    loss = BankLoss.apply(q, tau, stats.m, stats.z, stats.t, stats.w, s_y, g_y)
    _check_finite_loss(loss)
    return loss


# --------------------------------------------------------------------------------------------
# validation, the reference, the public entry point
# --------------------------------------------------------------------------------------------

def validate_loss_inputs(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor,
                         temperature: Temperature, exclude_rows: Optional[torch.Tensor], similarity: str,
                         n_rows: Optional[int] = None) -> torch.Tensor:
    """Check every argument of :func:`bank_contrastive_loss` (one host sync); return tau as a tensor.

    Shapes: query (B, D); bank (N, D) for "dot" or (N, T, D) for "max_token"; target_rows (B,)
    int64 in [0, n_rows); exclude_rows None or (B, K) int64 in [0, n_rows) or -1 (padding), never a
    query's target. ``n_rows`` defaults to N (the sharded loss passes the whole bank's size).
    Returns the temperature as a 0-dim tensor in the compute dtype (float32, or float64 for a
    float64 query), still attached to the caller's graph.
    """
    checks = check_embeddings(query, bank, similarity, what="bank", finite_rows=False)  # similarity too
    n = bank.shape[0] if n_rows is None else n_rows
    checks += check_rows("target_rows", target_rows, query.shape[0], n, query.device, padded=False, queries="B")
    checks += check_rows("exclude_rows", exclude_rows, query.shape[0], n, query.device, padded=True, queries="B")
    tau, tau_checks = as_temperature(temperature, query)
    settle(checks + check_not_excluded(target_rows, exclude_rows) + tau_checks)
    return tau


def naive_bank_contrastive_loss(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor,
                                temperature: Temperature, *, exclude_rows: Optional[torch.Tensor] = None,
                                similarity: str = "dot") -> torch.Tensor:
    """The reference: full (B, N) logits, excluded ones at -inf, ``F.cross_entropy``, plain autograd.

    Same arguments, checks and precision rule as :func:`bank_contrastive_loss`; holds B x N (x T)
    floats, so use it only for small banks or as a test oracle. Returns the 0-dim mean loss.
    """
    tau = validate_loss_inputs(query, bank, target_rows, temperature, exclude_rows, similarity)
    q = query.to(tau.dtype)
    b = bank.detach().to(tau.dtype)
    if similarity == "dot":
        sims = q @ b.T  # (B, D) @ (D, N) -> (B, N)
    else:
        sims = torch.einsum("bd,ntd->bnt", q, b).amax(dim=2)  # (B, N, T) -> (B, N)
    logits = sims / tau
    if exclude_rows is not None:
        query_index, k_index = (exclude_rows >= 0).nonzero(as_tuple=True)
        logits = logits.index_put((query_index, exclude_rows[query_index, k_index]),
                                  torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
    loss = F.cross_entropy(logits, target_rows)
    _check_finite_loss(loss)
    return loss


def bank_contrastive_loss(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor,
                          temperature: Temperature, *, exclude_rows: Optional[torch.Tensor] = None,
                          similarity: str = "dot", chunk_size: Optional[int] = None,
                          precision: str = "exact") -> torch.Tensor:
    """Mean InfoNCE loss of each query against every row of a static bank.

    Args:
        query: (B, D) float tensor, the composed queries (normalise them yourself).
        bank: (N, D) for ``similarity="dot"`` or (N, T, D) for ``"max_token"`` (score = max over T of
            <q, b_t>); float32, bfloat16 or float16 (float64 accepted for tests). Never receives a
            gradient.
        target_rows: (B,) int64, the bank row of each query's positive.
        temperature: python float or 0-dim tensor (may require grad: its gradient is computed).
        exclude_rows: (B, K) int64, -1 padded: bank rows removed from query i's softmax
            (false negatives such as its reference image). Excluding the target is an error.
        similarity: "dot" or "max_token".
        chunk_size: bank rows per chunk; giving it forces the chunked torch backend. None chooses
            the backend (see :func:`select_path`) and the chunk size (:func:`default_chunk_size`).
        precision: the Triton backend's products over a half-precision bank: "exact" (float32-grade,
            the default), "fast" (query and softmax weights rounded once to the bank's dtype) or
            "two_pass" (the rounding of "fast"; a logsumexp pass, then bf16 softmax weights chunk by
            chunk and one GEMM each for the query gradient: fewer products, see
            :mod:`cir_plugins.negatives.fused`). The chunked torch backend is always float32.

    Returns:
        0-dim tensor in float32 (float64 for a float64 query): equals
        ``F.cross_entropy(sim(query, bank) / temperature, target_rows)`` with excluded logits at
        -inf, to float rounding, without holding the (B, N) matrix. The single-process case of
        :func:`cir_plugins.negatives.distributed.sharded_bank_contrastive_loss`.
    """
    check_chunk_size(chunk_size)
    if precision not in PRECISIONS:
        raise ConfigError(explain("unknown precision", got=precision, expected=PRECISIONS,
                                  fix="use 'exact' (default), 'fast' or 'two_pass'"))
    tau = validate_loss_inputs(query, bank, target_rows, temperature, exclude_rows, similarity)
    backend = "triton" if select_path(query, bank, similarity, chunk_size) == "fused" else "torch"
    return sharded_loss(query, tau, bank.detach(), target_rows, exclude_rows, similarity, backend=backend,
                        chunk_size=chunk_size, precision=precision)
