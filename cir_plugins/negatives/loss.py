"""The stage-2 contrastive loss against a static bank of every gallery image: one entry point.

:func:`bank_contrastive_loss` validates its inputs, picks a backend for the bank-softmax statistics of
:mod:`cir_plugins.negatives.core` and returns the loss through the one autograd Function there:

* ``backend``: "torch" (chunks of the bank, never holding ``B x N``), "triton" (the fused CUDA kernel of
  :mod:`cir_plugins.negatives.fused`) or "auto" (Triton on CUDA when it accepts the tensors, else torch).
* ``precision``: the Triton backend's products over a half bank (:data:`PRECISIONS`, see the fused module); the
  torch backend accumulates in float32 (float64 for a float64 query) whatever the bank's dtype.
* ``shard``: a :class:`~cir_plugins.negatives.distributed.BankShard` when each rank holds only its rows.

:func:`naive_bank_contrastive_loss` is the reference every backend and the sharded path are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import as_temperature, check_chunk_size, check_embeddings, check_not_excluded, check_rows, settle
from ..errors import ConfigError, explain
from ..similarity import similarity as scores
from .core import PRECISIONS, BankLoss, check_finite_loss, target_term, torch_bank_stats
from .distributed import BankShard

__all__ = ["bank_contrastive_loss", "naive_bank_contrastive_loss", "select_backend", "validate_loss_inputs",
           "BACKENDS", "PRECISIONS"]

BACKENDS = ("auto", "torch", "triton")

Temperature = float | torch.Tensor


def _fused_module():
    """The optional Triton module, or None when it is absent from this checkout."""
    try:
        from . import fused  # noqa: PLC0415 - optional, imported lazily
    except ModuleNotFoundError as exc:  # only the absence of that very module is tolerated
        if exc.name != f"{__package__}.fused":
            raise
        return None
    return fused


def select_backend(query: torch.Tensor, bank: torch.Tensor, similarity: str = "dot",
                   chunk_size: int | None = None) -> str:
    """What ``backend="auto"`` runs: "triton" on CUDA when the fused module accepts the tensors and no
    ``chunk_size`` is given (a chunk size is a torch-backend setting), else "torch"."""
    if chunk_size is None and query.is_cuda:
        fused = _fused_module()
        if fused is not None and fused.fused_available(query, bank, similarity):
            return "triton"
    return "torch"


def validate_loss_inputs(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor,
                         temperature: Temperature, exclude_rows: torch.Tensor | None, similarity: str,
                         n_rows: int | None = None) -> torch.Tensor:
    """Check every argument of the loss (shapes: :func:`bank_contrastive_loss`; ``n_rows``, the whole bank's N,
    defaults to N) in one host sync; return tau as a 0-dim tensor in the compute dtype (float32, float64 for a
    float64 query), still attached to the caller's graph."""
    checks = check_embeddings(query, bank, similarity, what="bank", finite_rows=False)  # similarity too
    n = bank.shape[0] if n_rows is None else n_rows
    checks += check_rows("target_rows", target_rows, query.shape[0], n, query.device, padded=False, queries="B")
    checks += check_rows("exclude_rows", exclude_rows, query.shape[0], n, query.device, padded=True, queries="B")
    tau, tau_checks = as_temperature(temperature, query)
    settle(checks + check_not_excluded(target_rows, exclude_rows) + tau_checks)
    return tau


def naive_bank_contrastive_loss(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor,
                                temperature: Temperature, *, exclude_rows: torch.Tensor | None = None,
                                similarity: str = "dot") -> torch.Tensor:
    """The reference: full (B, N) logits, excluded ones at -inf, ``F.cross_entropy``, plain autograd. Arguments,
    checks and precision as :func:`bank_contrastive_loss`; holds B x N (x T) floats (small banks, test oracle)."""
    tau = validate_loss_inputs(query, bank, target_rows, temperature, exclude_rows, similarity)
    logits = scores(query, bank.detach(), similarity, bf16=False, dtype=tau.dtype) / tau  # (B, N)
    if exclude_rows is not None:
        query_index, k_index = (exclude_rows >= 0).nonzero(as_tuple=True)
        logits = logits.index_put((query_index, exclude_rows[query_index, k_index]), logits.new_tensor(float("-inf")))
    loss = F.cross_entropy(logits, target_rows)
    check_finite_loss(loss)
    return loss


def _check_options(backend: str, precision: str, chunk_size: int | None) -> None:
    """ConfigError on an unknown backend or precision, a bad chunk size, or a chunk size for the triton backend."""
    if backend not in BACKENDS:
        raise ConfigError(explain("unknown backend", got=backend, expected=BACKENDS, fix="use 'auto' (default)"))
    if precision not in PRECISIONS:
        raise ConfigError(explain("unknown precision", got=precision, expected=PRECISIONS,
                                  fix="use 'exact' (default), 'fast' or 'two_pass'"))
    check_chunk_size(chunk_size)
    if chunk_size is not None and backend == "triton":
        raise ConfigError(explain("chunk_size is a setting of the torch backend", got=f"backend='triton', "
                                  f"chunk_size={chunk_size}", fix="drop chunk_size, or use backend='torch'"))


def _resolve_backend(backend: str, query: torch.Tensor, bank: torch.Tensor, similarity: str,
                     chunk_size: int | None) -> str:
    """The backend that runs: "auto" through :func:`select_backend`; "triton" checked (a rank whose shard holds no
    row has nothing to score, and runs the torch backend's empty statistics)."""
    if backend == "auto" or (backend == "triton" and bank.shape[0] == 0):
        return select_backend(query, bank, similarity, chunk_size)
    if backend == "triton":
        fused = _fused_module()
        if fused is None or not fused.fused_available(query, bank, similarity):
            why = f"; triton did not import: {fused.TRITON_ERROR}" if fused is not None and fused.TRITON_ERROR else ""
            raise ConfigError(explain("the triton backend cannot run on these tensors",
                                      got=f"query {query.device} {query.dtype}, bank {bank.device} {bank.dtype}{why}",
                                      fix="use CUDA tensors in float32/bf16/fp16 with triton installed, or "
                                      "backend='auto'"))
    return backend


def bank_contrastive_loss(query: torch.Tensor, bank: torch.Tensor, target_rows: torch.Tensor,
                          temperature: Temperature, *, exclude_rows: torch.Tensor | None = None,
                          similarity: str = "dot", backend: str = "auto", precision: str = "exact",
                          shard: BankShard | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Mean InfoNCE loss of each query against every row of a static bank.

    Args:
        query: (B, D) float tensor, the composed queries (normalise them yourself).
        bank: (N, D) for ``similarity="dot"`` or (N, T, D) for ``"max_token"`` (score = max over T of <q, b_t>);
            float32, bfloat16 or float16 (float64 for tests); never receives a gradient. With ``shard``, this
            rank's rows only.
        target_rows: (B,) int64, the bank row of each query's positive (global rows with ``shard``).
        temperature: python float or 0-dim tensor (may require grad: its gradient is computed).
        exclude_rows: (B, K) int64, -1 padded: bank rows removed from query i's softmax (false negatives such as
            its reference image); excluding the target is an error.
        similarity, backend, precision: "dot" / "max_token"; "auto", "torch" or "triton"; "exact", "fast" or
            "two_pass" (module doc).
        shard: this rank's :class:`BankShard` under torchrun (every rank must call; B may differ between ranks).
        chunk_size: bank rows per chunk of the torch backend (None: from CHUNK_BUDGET_BYTES).

    Returns:
        0-dim tensor in float32 (float64 for a float64 query): ``F.cross_entropy(sim(query, bank) / temperature,
        target_rows)`` with excluded logits at -inf, to float rounding, without holding the (B, N) matrix.
    """
    _check_options(backend, precision, chunk_size)
    exchange = None
    if shard is None:
        tau = validate_loss_inputs(query, bank, target_rows, temperature, exclude_rows, similarity)
        backend = _resolve_backend(backend, query, bank, similarity, chunk_size)
    else:
        holder = {}

        def checks():  # run inside the collective's layout check: a refusal on one rank is an error on all
            probe = bank if bank.shape[0] else bank.new_zeros(1, *bank.shape[1:])  # layout only
            holder["tau"] = validate_loss_inputs(query, probe, target_rows, temperature, exclude_rows, similarity,
                                                 n_rows=shard.n_total)
            holder["backend"] = _resolve_backend(backend, query, bank, similarity, chunk_size)
            return 0 if exclude_rows is None else exclude_rows.shape[1]

        exchange = shard.join(query, bank, checks)
        tau, backend = holder["tau"], holder["backend"]
    return _loss(query, tau, bank.detach(), target_rows, exclude_rows, similarity, backend=backend,
                 chunk_size=chunk_size, precision=precision, exchange=exchange)


def _loss(query, tau, bank, target_rows, exclude_rows, similarity, *, backend, chunk_size, precision, exchange):
    """Statistics, target term, (combination across ranks), BankLoss, on validated inputs."""
    q = query.to(tau.dtype)
    sharded = exchange is not None
    need_w = sharded or (torch.is_grad_enabled() and q.requires_grad)
    need_t = sharded or (torch.is_grad_enabled() and tau.requires_grad)
    with torch.no_grad():
        q_all, rows, excl = q.detach(), target_rows, exclude_rows
        if sharded:
            q_all, rows, excl = exchange.gather(q_all, target_rows, exclude_rows)
        if backend == "triton":
            half = query.dtype in (torch.bfloat16, torch.float16)  # a half query goes to the kernel as it is
            stats = _fused_module().bank_partials(q_all.to(query.dtype) if half else q_all, bank, tau.detach(), excl,
                                                  need_w=need_w, precision=precision).to(q.dtype)
        else:
            stats = torch_bank_stats(q_all, bank, tau.detach(), excl, similarity, chunk_size=chunk_size,
                                     need_w=need_w or need_t)
        if not need_t:
            stats.t = None
        s_y, g_y = target_term(q_all, bank, rows, similarity)
        if sharded:
            stats, s_y, g_y = exchange.combine(stats, s_y, g_y)
    loss = BankLoss.apply(q, tau, stats.m, stats.z, stats.t, stats.w, s_y, g_y)
    check_finite_loss(loss)
    return loss
