"""The mathematics of the stage-2 bank loss, once: softmax statistics over the bank and one autograd Function.

For query ``q_i`` with positive bank row ``y_i`` the loss is

    L = mean_i [ logsumexp_j( s(q_i, b_j) / tau ) - s(q_i, b_{y_i}) / tau ]

over every bank row j not excluded for query i. ``s`` is the dot product (bank ``(N, D)``) or its maximum over a
target's tokens (bank ``(N, T, D)``, ``"max_token"``). The loss and its gradients need only softmax statistics over
the bank (:class:`BankStats`): the max logit ``m``, ``z = sum exp(l - m)``, ``t = sum exp(l - m) s`` (``E_p[s] =
t / z``) and ``w = sum exp(l - m) g``, ``g`` the bank row (its winning token for max_token; ``E_p[b] = w / z``):

    L_i = m_i + log z_i - s_iy / tau,   dL_i/dq_i = (E_p[b] - b_y) / tau,   dL_i/dtau = (s_iy - E_p[s]) / tau^2.

Chunks of the bank (:func:`torch_bank_stats`), the Triton kernel's splits and the ranks of a sharded bank are all
merged by :meth:`BankStats.combine`; :class:`BankLoss` turns the statistics and the target term into the loss and
its backward. The entry point is :func:`cir_plugins.negatives.loss.bank_contrastive_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NonFiniteError, explain
from ..similarity import mask_rows_, rows_in_budget

__all__ = ["BankStats", "BankLoss", "torch_bank_stats", "target_term", "default_chunk_size", "check_finite_loss",
           "CHUNK_BUDGET_BYTES", "EMPTY_MAX", "PRECISIONS"]

# Bytes of one chunk's (B, chunk, T) float32 score block in the torch backend (benchmarks/RESULTS.md, bank loss on CPU)
CHUNK_BUDGET_BYTES = 16 << 20
MIN_CHUNK = 64
# The running max of queries with no admissible row (yet): exp(EMPTY_MAX - m) == 0 for any real m.
EMPTY_MAX = -1.0e30
# Products of the Triton backend over a half bank (cir_plugins.negatives.fused); the torch backend is float32.
PRECISIONS = ("exact", "fast", "two_pass")


@dataclass
class BankStats:
    """Softmax statistics of ``s / tau`` over (a part of) the bank, per query, in the compute dtype (a leading split
    dim S before :meth:`combine`): m (B,) max logit (``EMPTY_MAX`` when no row is admissible), z (B,), t (B,) (of
    the raw similarities, not divided by tau) or None, w (B, D) or None when not requested (module doc)."""

    m: torch.Tensor
    z: torch.Tensor
    t: torch.Tensor | None
    w: torch.Tensor | None

    def rescaled(self, m: torch.Tensor) -> BankStats:
        """The same sums expressed relative to a larger max ``m`` (broadcastable to ``self.m``)."""
        scale = torch.exp(self.m - m)
        return BankStats(m.expand_as(self.m), self.z * scale, None if self.t is None else self.t * scale,
                         None if self.w is None else self.w * scale[..., None])

    def combine(self) -> BankStats:
        """Merge the parts along the leading dim (chunks, kernel splits): (S, B) -> (B,)."""
        r = self.rescaled(self.m.amax(dim=0))
        return BankStats(r.m[0], r.z.sum(0), None if r.t is None else r.t.sum(0), None if r.w is None else r.w.sum(0))

    def to(self, dtype: torch.dtype) -> BankStats:
        return BankStats(*(None if x is None else x.to(dtype) for x in (self.m, self.z, self.t, self.w)))

    @staticmethod
    def stack(parts) -> BankStats:
        fields = zip(*((p.m, p.z, p.t, p.w) for p in parts))
        return BankStats(*(None if values[0] is None else torch.stack(values) for values in fields))


def default_chunk_size(batch: int, tokens: int = 1) -> int:
    """Rows per chunk so that one (batch, chunk, tokens) float32 block fits CHUNK_BUDGET_BYTES (read at call time)."""
    return rows_in_budget(CHUNK_BUDGET_BYTES, batch, tokens, MIN_CHUNK)


def chunk_stats(q_tau, q, chunk, exclude_rows, start, similarity, need_w, buffer) -> BankStats:
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
        mask_rows_(logits, exclude_rows, start)  # excluded -> -inf
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


def torch_bank_stats(q, bank, tau, exclude_rows, similarity, *, chunk_size=None, need_w=True) -> BankStats:
    """The chunked PyTorch backend: q (B, D) compute dtype, detached; bank (N, D) or (N, T, D); each
    chunk's statistics merged into the running ones, never holding (B, N). An empty bank gives EMPTY_MAX."""
    tokens = bank.shape[1] if similarity == "max_token" else 1
    step = min(chunk_size or default_chunk_size(q.shape[0], tokens), max(1, bank.shape[0]))
    buffer = q.new_empty(q.shape[0] * step * tokens)
    q_tau = q / tau
    running = None
    for start in range(0, bank.shape[0], step):
        chunk = bank[start:start + step].to(q.dtype)  # (C, D) or (C, T, D)
        part = chunk_stats(q_tau, q, chunk, exclude_rows, start, similarity, need_w, buffer)
        running = part if running is None else BankStats.stack([running, part]).combine()
    if running is None:  # an empty shard
        zeros = q.new_zeros(q.shape[0])
        running = BankStats(torch.full_like(zeros, EMPTY_MAX), zeros, zeros.clone(), torch.zeros_like(q))
    return running


def target_term(query: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, similarity: str):
    """s(q_i, b_{y_i}) (B,) and the bank vector it came from (B, D) (the winning token for max_token); query (B, D)
    compute dtype; rows (B,), -1 where another shard owns the target: zeros there (the owner adds them)."""
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


class BankLoss(torch.autograd.Function):
    """forward(query (B, D), tau 0-dim, m, z (B,), t (B,) or None, w (B, D) or None, s_y (B,), g_y (B, D)) -> the
    0-dim mean of ``m + log z - s_y / tau``; only ``query`` and ``tau`` get gradients (module doc's formulas)."""

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


def check_finite_loss(loss: torch.Tensor) -> None:
    """NonFiniteError when the loss is NaN or inf."""
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteError(explain("the bank loss is not finite", got=float(loss.detach()),
                                     fix="check the bank for NaN/inf rows (rebuild it) and the temperature"))
