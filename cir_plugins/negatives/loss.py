"""The stage-2 contrastive loss against a static bank of every gallery image.

For query ``q_i`` with positive bank row ``y_i`` the loss is

    L = mean_i [ logsumexp_j( s(q_i, b_j) / tau ) - s(q_i, b_{y_i}) / tau ]

over every bank row j that is not excluded for query i (excluded rows get a logit of -inf).
``s`` is the dot product (bank ``(N, D)``) or the maximum over a target's tokens of the dot
product (bank ``(N, T, D)``, similarity ``"max_token"``).

Three interchangeable implementations, chosen automatically by :func:`select_path`:

* ``"full"``: :func:`naive_bank_contrastive_loss`, the full ``(B, N)`` logits and plain autograd.
  Used when ``B * N * T`` is small. It is also the documented reference the others are tested
  against.
* ``"chunked"``: :class:`ChunkedBankLoss`, an autograd Function that never holds ``B x N``. One
  pass over the bank, chunk by chunk, keeps an online logsumexp (running max and sum) and, in the
  same pass, the softmax-weighted sum of bank rows (for the query gradient) and the
  softmax-weighted sum of similarities (for the temperature gradient), rescaled whenever the running
  max grows. Backward only scales the saved gradients by ``grad_output``. Per chunk it does two
  matrix products (scores and weighted rows), the same work as naive forward + backward.
* ``"fused"``: a Triton kernel in ``cir_plugins.negatives.fused`` (CUDA, either similarity) used
  when that module exists and says it can handle the inputs.

Precision: the query is cast to float32 (float64 when it is float64) and every bank chunk is
upcast to that dtype before the products, so a bf16 / fp16 bank is accumulated in float32. The
returned loss has that compute dtype.

Gradients flow to the query and to the temperature, never to the bank (it is detached; its
``requires_grad`` does not matter and it never gets a ``.grad``).
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DeviceError, DTypeError, NonFiniteError, ShapeError, explain

__all__ = [
    "bank_contrastive_loss",
    "naive_bank_contrastive_loss",
    "select_path",
    "default_chunk_size",
    "validate_loss_inputs",
    "exclusion_mask_for_chunk",
    "ChunkedBankLoss",
    "SIMILARITIES",
    "FULL_PATH_MAX_ELEMENTS",
    "CHUNK_BUDGET_BYTES",
]

logger = logging.getLogger(__name__)

SIMILARITIES = ("dot", "max_token")
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
QUERY_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Full logits are used while B * N * T is at most this many elements (4 MiB of float32 logits):
# below that the chunk loop's Python overhead is not worth saving the memory.
FULL_PATH_MAX_ELEMENTS = 1 << 20
# Bytes of one chunk's (B, chunk, T) float32 score block in the chunked path. Chosen with
# benchmarks/bank_loss.py on the 2-core dev CPU (see benchmarks/RESULTS.md): big enough that the
# matrix products dominate the per-chunk overhead, small enough to stay far below the full logits.
CHUNK_BUDGET_BYTES = 16 << 20
_MIN_CHUNK = 64

Temperature = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def validate_loss_inputs(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor,
                         temperature: Temperature, exclude_rows: Optional[torch.Tensor],
                         similarity: str) -> torch.Tensor:
    """Check every argument of :func:`bank_contrastive_loss`; return the temperature as a tensor.

    Shapes: query (B, D); bank (N, D) for "dot" or (N, T, D) for "max_token"; target_rows (B,)
    int64 in [0, N); exclude_rows None or (B, K) int64 with values in [0, N) or -1 (padding), never
    equal to the query's target row. Returns the temperature as a 0-dim tensor in the compute dtype
    (float32, or float64 for a float64 query) on the query's device, still attached to the caller's
    graph when the caller's temperature requires grad.
    """
    if similarity not in SIMILARITIES:
        raise ConfigError(explain("unknown similarity", got=similarity, expected=" or ".join(SIMILARITIES),
                                  fix="use 'dot' for single-vector banks and 'max_token' for (N, T, D) banks"))
    for name, tensor in (("query", query), ("bank", bank), ("target_rows", target_rows)):
        if not isinstance(tensor, torch.Tensor):
            raise DTypeError(explain(f"{name} must be a torch.Tensor", got=type(tensor).__name__,
                                     fix=f"pass {name} as a tensor"))
    if query.dim() != 2:
        raise ShapeError(explain("query must be 2-D (B, D)", got=tuple(query.shape),
                                 fix="stack the composed queries into one (B, D) tensor"))
    want_bank_dim = 2 if similarity == "dot" else 3
    if bank.dim() != want_bank_dim:
        layout = "(N, D)" if similarity == "dot" else "(N, T, D)"
        raise ShapeError(explain(f"a bank for similarity {similarity!r} must be {want_bank_dim}-D {layout}",
                                 got=tuple(bank.shape),
                                 fix="use similarity='max_token' for multi-vector (N, T, D) banks and 'dot' for (N, D)"))
    batch, dim = query.shape
    if batch == 0 or bank.shape[0] == 0 or dim == 0 or (similarity == "max_token" and bank.shape[1] == 0):
        raise ShapeError(explain("query and bank must be non-empty", got=(tuple(query.shape), tuple(bank.shape)),
                                 fix="pass at least one query, one bank row and one embedding dim"))
    if bank.shape[-1] != dim:
        raise ShapeError(explain("query and bank embedding dims differ", got=(dim, bank.shape[-1]),
                                 expected="the same D", fix="encode the query and the bank with the same model"))
    if query.dtype not in QUERY_DTYPES:
        raise DTypeError(explain("query must be a floating tensor", got=query.dtype,
                                 expected=[str(d) for d in QUERY_DTYPES], fix="cast the query with .float()"))
    if bank.dtype not in BANK_DTYPES:
        raise DTypeError(explain("bank dtype not supported", got=bank.dtype,
                                 expected=[str(d) for d in BANK_DTYPES], fix="store the bank as bf16, fp16 or fp32"))
    if target_rows.dtype != torch.int64:
        raise DTypeError(explain("target_rows must be int64", got=target_rows.dtype, fix="use .long()"))
    if target_rows.shape != (batch,):
        raise ShapeError(explain("target_rows must have shape (B,) with B = query rows",
                                 got=tuple(target_rows.shape), expected=(batch,),
                                 fix="give one bank row per query"))
    if bank.device != query.device or target_rows.device != query.device:
        raise DeviceError(explain("query, bank and target_rows must be on one device",
                                  got=(str(query.device), str(bank.device), str(target_rows.device)),
                                  fix="move them with .to(query.device)"))
    n_rows = bank.shape[0]
    if exclude_rows is not None:
        if not isinstance(exclude_rows, torch.Tensor):
            raise DTypeError(explain("exclude_rows must be a tensor or None", got=type(exclude_rows).__name__,
                                     fix="pass a (B, K) int64 tensor padded with -1"))
        if exclude_rows.dtype != torch.int64:
            raise DTypeError(explain("exclude_rows must be int64", got=exclude_rows.dtype, fix="use .long()"))
        if exclude_rows.dim() != 2 or exclude_rows.shape[0] != batch:
            raise ShapeError(explain("exclude_rows must be (B, K), -1 padded", got=tuple(exclude_rows.shape),
                                     expected=f"({batch}, K)", fix="one row of excluded bank rows per query"))
        if exclude_rows.device != query.device:
            raise DeviceError(explain("exclude_rows must be on the query's device", got=str(exclude_rows.device),
                                      expected=str(query.device), fix="move it with .to(query.device)"))
    cdtype = _compute_dtype(query)
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ShapeError(explain("temperature must be a python float or a 0-dim tensor",
                                     got=tuple(temperature.shape), fix="pass e.g. torch.tensor(0.02)"))
        if not temperature.is_floating_point():
            raise DTypeError(explain("temperature must be a floating tensor", got=temperature.dtype,
                                     fix="use torch.tensor(0.02)"))
        if temperature.device != query.device:
            raise DeviceError(explain("temperature must be on the query's device", got=str(temperature.device),
                                      expected=str(query.device), fix="move the temperature to the model's device"))
        tau = temperature.to(cdtype)
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        tau = torch.tensor(float(temperature), dtype=cdtype, device=query.device)
    else:
        raise DTypeError(explain("temperature must be a python float or a 0-dim tensor",
                                 got=type(temperature).__name__, fix="pass e.g. 0.02"))

    # Value checks: each is a 0-dim bool on the query's device; they are read back in ONE host sync
    # (this runs every training step), and only a failing check computes its detailed message.
    target_out = (target_rows < 0) | (target_rows >= n_rows)  # (B,)
    flags = [target_out.any(), ~torch.isfinite(query).all()]
    if exclude_rows is not None:
        exclude_out = (exclude_rows < -1) | (exclude_rows >= n_rows)  # (B, K)
        clash = (exclude_rows == target_rows[:, None]).any(1)  # (B,)
        flags += [exclude_out.any(), clash.any()]
    tau_value = tau.detach()
    flags.append(~(torch.isfinite(tau_value) & (tau_value > 0)))
    failed = torch.stack(flags).tolist()  # the single sync
    if not any(failed):
        return tau
    if failed[0]:
        bad = target_out.nonzero().flatten()[:5].tolist()
        raise ShapeError(explain("target_rows out of range", got={i: int(target_rows[i]) for i in bad},
                                 expected=f"rows in [0, {n_rows})", fix="index the positives by bank row"))
    if failed[1]:
        bad = (~torch.isfinite(query)).any(1).nonzero().flatten()[:5].tolist()
        raise NonFiniteError(explain("query contains NaN or infinity", got=f"query rows {bad}",
                                     fix="check the model output (learning rate, AMP overflow)"))
    if exclude_rows is not None and failed[2]:
        where = exclude_out.nonzero()[0].tolist()
        raise ShapeError(explain("exclude_rows out of range", got=f"{int(exclude_rows[where[0], where[1]])} "
                                 f"for query {where[0]}", expected=f"rows in [0, {n_rows}) or -1 as padding",
                                 fix="index exclusions by bank row and pad with -1"))
    if exclude_rows is not None and failed[3]:
        bad = clash.nonzero().flatten()[:5].tolist()
        raise ConfigError(explain("a query excludes its own target row", got=f"queries {bad}",
                                  fix="never exclude the positive; mask only false negatives"))
    raise ConfigError(explain("temperature must be finite and positive", got=float(tau_value), expected="> 0",
                              fix="use e.g. 0.02; parametrise a learnable one as exp(log_tau)"))


# --------------------------------------------------------------------------------------------
# pieces shared by the paths
# --------------------------------------------------------------------------------------------

def default_chunk_size(batch: int, tokens: int = 1, budget_bytes: Optional[int] = None) -> int:
    """Bank rows per chunk so that one (batch, chunk, tokens) float32 block fits ``budget_bytes``.

    ``budget_bytes`` defaults to the module's CHUNK_BUDGET_BYTES (read at call time).
    """
    budget = CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(_MIN_CHUNK, budget // (4 * max(1, batch) * max(1, tokens)))


def select_path(query: torch.Tensor, bank: torch.Tensor, similarity: str = "dot",
                chunk_size: Optional[int] = None) -> str:
    """Which implementation :func:`bank_contrastive_loss` uses: "fused", "full" or "chunked".

    A given ``chunk_size`` forces the chunked path. Otherwise: "fused" on CUDA (either similarity)
    when the Triton module is present and accepts the inputs; "full" when B * N * T is at most
    FULL_PATH_MAX_ELEMENTS; else "chunked".
    """
    if chunk_size is not None:
        return "chunked"
    if query.is_cuda:
        fused = _fused_module()
        if fused is not None and fused.fused_available(query, bank, similarity):
            return "fused"
    tokens = bank.shape[1] if similarity == "max_token" else 1
    if query.shape[0] * bank.shape[0] * tokens <= FULL_PATH_MAX_ELEMENTS:
        return "full"
    return "chunked"


def _fused_module():
    """The optional Triton module, or None when it is not installed in this checkout."""
    try:
        from . import fused  # noqa: PLC0415 - optional, imported lazily
    except ModuleNotFoundError as exc:  # only the absence of that very module is tolerated
        if exc.name != f"{__package__}.fused":
            raise
        return None
    return fused


def exclusion_mask_for_chunk(exclude_rows: torch.Tensor, start: int, stop: int):
    """Positions to mask inside the bank chunk ``[start, stop)``.

    exclude_rows (B, K) int64, -1 padded. Returns (query_index, column_index), two 1-D int64
    tensors: query i excludes the chunk's column c = row - start.
    """
    local = exclude_rows - start  # (B, K) column inside the chunk
    hit = (exclude_rows >= 0) & (local >= 0) & (local < stop - start)  # (B, K)
    query_index, k_index = hit.nonzero(as_tuple=True)
    return query_index, local[query_index, k_index]


def _scores(query: torch.Tensor, bank_chunk: torch.Tensor, similarity: str):
    """Similarities of every query with every bank row of a chunk, in the query's dtype.

    query (B, D); bank_chunk (C, D) or (C, T, D), already in the query's dtype.
    Returns (scores (B, C), token_scores (B, C, T) or None, winning token (B, C) or None).
    """
    if similarity == "dot":
        return query @ bank_chunk.T, None, None  # (B, D) @ (D, C) -> (B, C)
    c, t, d = bank_chunk.shape
    token_scores = (query @ bank_chunk.reshape(c * t, d).T).view(query.shape[0], c, t)  # (B, D)@(D, C*T) -> (B, C, T)
    best, arg = token_scores.max(dim=2)  # (B, C) each
    return best, token_scores, arg


def _target_scores(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor, similarity: str):
    """s(q_i, b_{y_i}) and the bank vector it came from.

    Returns (scores (B,), rows (B, D)): for max_token, the row is the winning token of the target.
    """
    rows = bank[target_rows].to(query.dtype)  # (B, D) or (B, T, D)
    if similarity == "dot":
        return (query * rows).sum(-1), rows
    token_scores = torch.einsum("bd,btd->bt", query, rows)  # (B, T)
    best, arg = token_scores.max(dim=1)
    return best, rows[torch.arange(rows.shape[0], device=rows.device), arg]  # (B, D)


# --------------------------------------------------------------------------------------------
# the reference / full path
# --------------------------------------------------------------------------------------------

def naive_bank_contrastive_loss(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor,
                                temperature: Temperature, *, exclude_rows: Optional[torch.Tensor] = None,
                                similarity: str = "dot") -> torch.Tensor:
    """The reference: full (B, N) logits, excluded ones at -inf, ``F.cross_entropy``, plain autograd.

    Same arguments, checks and precision rule as :func:`bank_contrastive_loss`; holds B x N (x T)
    floats, so use it only for small banks or as a test oracle. Returns the 0-dim mean loss.
    """
    tau = validate_loss_inputs(query, bank, target_rows, temperature, exclude_rows, similarity)
    return _full_loss(query, bank, target_rows, tau, exclude_rows, similarity)


def _full_loss(query, bank, target_rows, tau, exclude_rows, similarity):
    cdtype = _compute_dtype(query)
    q = query.to(cdtype)
    b = bank.detach().to(cdtype)
    if similarity == "dot":
        sims = q @ b.T  # (B, D) @ (D, N) -> (B, N)
    else:
        n, t, d = b.shape
        sims = (q @ b.reshape(n * t, d).T).view(q.shape[0], n, t).amax(dim=2)  # (B, N*T) -> (B, N, T) -> (B, N)
    logits = sims / tau
    if exclude_rows is not None:
        qi, col = exclusion_mask_for_chunk(exclude_rows, 0, b.shape[0])
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[qi, col] = True
        logits = logits.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, target_rows)
    _check_finite_loss(loss)
    return loss


def _check_finite_loss(loss: torch.Tensor) -> None:
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteError(explain("the bank loss is not finite", got=float(loss.detach()),
                                     fix="check the bank for NaN/inf rows (rebuild it) and the temperature"))


# --------------------------------------------------------------------------------------------
# the chunked path
# --------------------------------------------------------------------------------------------

class ChunkedBankLoss(torch.autograd.Function):
    """One streaming pass over the bank: loss, d/dquery and d/dtemperature together.

    forward(query (B, D) compute dtype, tau 0-dim compute dtype, bank (N, D) or (N, T, D) any
    supported dtype, target_rows (B,), exclude_rows (B, K) or None, similarity, chunk_size)
    -> 0-dim mean loss. Holds at most one (B, chunk, T) block; saves lse (B,), the target logit
    (B,), d loss/d query (B, D) and d loss/d tau (0-dim). Inputs must be validated already.
    """

    @staticmethod
    def forward(ctx, query, tau, bank, target_rows, exclude_rows, similarity, chunk_size):
        need_q = ctx.needs_input_grad[0]
        need_tau = ctx.needs_input_grad[1]
        batch, dim = query.shape
        cdtype = query.dtype
        inv_tau = 1.0 / tau
        neg_inf = float("-inf")

        run_max = torch.full((batch,), neg_inf, dtype=cdtype, device=query.device)  # (B,)
        run_sum = torch.zeros(batch, dtype=cdtype, device=query.device)  # (B,) sum exp(z - max)
        run_rows = torch.zeros(batch, dim, dtype=cdtype, device=query.device) if need_q else None  # (B, D)
        run_sims = torch.zeros(batch, dtype=cdtype, device=query.device) if need_tau else None  # (B,)

        for start in range(0, bank.shape[0], chunk_size):
            stop = min(start + chunk_size, bank.shape[0])
            chunk = bank[start:stop].to(cdtype)  # (C, D) or (C, T, D)
            sims, token_scores, arg = _scores(query, chunk, similarity)  # (B, C)
            logits = sims * inv_tau  # (B, C); the only new (B, C) block besides the scores
            if exclude_rows is not None:
                qi, col = exclusion_mask_for_chunk(exclude_rows, start, stop)
                logits[qi, col] = neg_inf
            new_max = torch.maximum(run_max, logits.amax(dim=1))  # (B,)
            # a row whose candidates so far are all masked keeps max -inf: shift by 0 instead
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            rescale = torch.exp(run_max - safe_max)  # (B,) factor for everything accumulated so far
            weights = logits.sub_(safe_max[:, None]).exp_()  # (B, C) in place, 0 where masked
            run_sum = run_sum * rescale + weights.sum(dim=1)
            if need_q:
                if similarity == "dot":
                    weighted = weights @ chunk  # (B, C) @ (C, D) -> (B, D)
                else:
                    c, t, _ = chunk.shape
                    # put each weight on its winning token, zeros elsewhere: (B, C, T); reuse the buffer
                    spread = token_scores.zero_().scatter_(2, arg.unsqueeze(2), weights.unsqueeze(2))
                    weighted = spread.view(batch, c * t) @ chunk.reshape(c * t, dim)  # (B, C*T) @ (C*T, D)
                run_rows = run_rows * rescale[:, None] + weighted
            if need_tau:
                run_sims = run_sims * rescale + sims.mul_(weights).sum(dim=1)  # sims no longer needed
            run_max = new_max

        if not bool(torch.isfinite(run_max).all()):
            bad = (~torch.isfinite(run_max)).nonzero().flatten()[:5].tolist()
            raise NonFiniteError(explain("every bank row is masked or non-finite for some queries",
                                         got=f"queries {bad}", fix="check the bank for NaN/inf rows and the exclusions"))
        lse = run_max + torch.log(run_sum)  # (B,)
        target_sims, target_vecs = _target_scores(query, bank, target_rows, similarity)  # (B,), (B, D)
        target_logits = target_sims * inv_tau
        loss = (lse - target_logits).mean()
        _check_finite_loss(loss)

        grad_q = grad_tau = None
        if need_q:
            # dL/dq_i = (E_p[b] - b_y) / tau / B
            grad_q = (run_rows / run_sum[:, None] - target_vecs) * (inv_tau / batch)
        if need_tau:
            # dL/dtau = sum_i (s_iy - E_p[s_i]) / tau^2 / B
            grad_tau = ((target_sims - run_sims / run_sum).sum() * inv_tau * inv_tau / batch)
        ctx.save_for_backward(*(t for t in (grad_q, grad_tau) if t is not None))
        ctx.has = (grad_q is not None, grad_tau is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        saved = list(ctx.saved_tensors)
        grad_q = saved.pop(0) * grad_output if ctx.has[0] else None
        grad_tau = saved.pop(0) * grad_output if ctx.has[1] else None
        return grad_q, grad_tau, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# the public entry point
# --------------------------------------------------------------------------------------------

def bank_contrastive_loss(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor,
                          temperature: Temperature, *, exclude_rows: Optional[torch.Tensor] = None,
                          similarity: str = "dot", chunk_size: Optional[int] = None) -> torch.Tensor:
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
        chunk_size: bank rows per chunk; giving it forces the chunked path. None chooses the path
            and chunk size automatically (see :func:`select_path`, :func:`default_chunk_size`).

    Returns:
        0-dim tensor in float32 (float64 for a float64 query): equals
        ``F.cross_entropy(sim(query, bank) / temperature, target_rows)`` with excluded logits at
        -inf, to float rounding, without holding the (B, N) matrix when N is large.
    """
    tau = validate_loss_inputs(query, bank, target_rows, temperature, exclude_rows, similarity)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ConfigError(explain("chunk_size must be a positive int or None", got=chunk_size,
                                  fix="leave it None to size chunks automatically"))
    bank = bank.detach()
    path = select_path(query, bank, similarity, chunk_size)
    if path == "fused":
        fused = _fused_module()
        kernel = fused.fused_dot_bank_loss if similarity == "dot" else fused.fused_max_token_bank_loss
        loss = kernel(query, bank, target_rows, tau.to(torch.float32), exclude_rows)
        _check_finite_loss(loss)
        return loss
    if path == "full":
        return _full_loss(query, bank, target_rows, tau, exclude_rows, similarity)
    tokens = bank.shape[1] if similarity == "max_token" else 1
    chunk = chunk_size or default_chunk_size(query.shape[0], tokens)
    q = query.to(_compute_dtype(query))
    return ChunkedBankLoss.apply(q, tau, bank, target_rows, exclude_rows, similarity, chunk)
