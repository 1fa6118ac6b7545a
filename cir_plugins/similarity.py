"""Scoring primitives: the one place that turns queries and embedding rows into similarity scores.

``"dot"`` is the inner product of (Q, D) queries with (C, D) rows; ``"max_token"`` the maximum over T of the
inner products with (C, T, D) rows (multi-vector targets). Embeddings are L2-normalised before scoring, so
"dot" is the cosine. Metrics, the loss backends, stage 1, submission files and the search server all score
through :func:`similarity` (or its paired form :func:`scores_of_rows`).

On CUDA a bfloat16 gallery is scored in bfloat16 on tensor cores with float32 output: the float32 query is
split exactly into three bfloat16 parts (:func:`split_bf16`), and one matrix product against the repeated
rows accumulates in float32. Each bf16 x bf16 product is exact in float32, so the scores equal the upcast
path's up to the summation order. Other galleries (float16, float32; bf16 on CPU) are upcast to float32.
:func:`chunk_rows` sizes a (queries, chunk, T) float32 score block from ``SCORE_BUDGET_BYTES`` on CPU and
from free memory on CUDA (a quarter, clamped to ``CUDA_SCORE_BUDGET_MAX``: 4k queries x 1M rows in ~16
chunks instead of ~500).
"""

from __future__ import annotations

import torch

from .checks import check_chunk_size

__all__ = ["similarity", "scores_of_rows", "split_bf16", "mm_fp32_out", "GEMM_OUT_DTYPE", "mask_rows_",
           "use_bf16_scoring", "chunk_rows", "rows_in_budget", "score_budget", "SCORE_BUDGET_BYTES",
           "CUDA_SCORE_BUDGET_MAX"]

SCORE_BUDGET_BYTES = 32 << 20  # bytes of one (query block, chunk, T) float32 score block
CUDA_SCORE_BUDGET_MAX = 1 << 30  # upper bound of the CUDA score block (bytes)
MIN_CHUNK = 16


def score_budget(device: torch.device) -> int:
    """Bytes of one float32 score block: SCORE_BUDGET_BYTES on CPU, from free memory on CUDA."""
    if device.type != "cuda":
        return SCORE_BUDGET_BYTES
    free, _ = torch.cuda.mem_get_info(device)  # once per call, outside any chunk loop
    # the score block plus its comparison masks and top-k workspace stay within about half of free memory
    return int(min(CUDA_SCORE_BUDGET_MAX, max(SCORE_BUDGET_BYTES, free // 4)))


def rows_in_budget(budget_bytes: int, n_queries: int, tokens: int = 1, minimum: int = MIN_CHUNK) -> int:
    """Rows whose (n_queries, rows, tokens) float32 score block fits ``budget_bytes``; at least ``minimum``."""
    return max(minimum, budget_bytes // (4 * max(1, n_queries) * max(1, tokens)))


def chunk_rows(n_queries: int, tokens: int, chunk_size: int | None, device: torch.device | None = None) -> int:
    """Rows scored at once: ``chunk_size`` when given, else as many as fit one score block."""
    check_chunk_size(chunk_size)
    if chunk_size is not None:
        return chunk_size
    return rows_in_budget(score_budget(device if device is not None else torch.device("cpu")), n_queries, tokens)


def use_bf16_scoring(query: torch.Tensor, gallery: torch.Tensor) -> bool:
    """Score in bf16 with float32 output (tensor cores): CUDA and a bfloat16 gallery."""
    return gallery.is_cuda and gallery.dtype == torch.bfloat16


def split_bf16(x: torch.Tensor) -> torch.Tensor:
    """Exact three-way bfloat16 split of a float32 tensor: (..., D) -> (..., 3D) = [hi, mid, lo], concatenated
    so one matrix product sums them; hi + mid + lo == x exactly for normal values (24 significant bits, 8 each)."""
    x = x.float()
    hi = x.to(torch.bfloat16)
    rest = x - hi.float()  # exact in float32: x and hi agree in their leading bits
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)  # the remaining <= 8 significant bits: exact
    return torch.cat([hi, mid, lo], dim=-1)


# torch.mm / torch.bmm(..., out_dtype=) (torch >= 2.8); without them a half GEMM with float32 output is done in float32
GEMM_OUT_DTYPE = all("dtype" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.bmm))


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) bf16 @ (K, N) bf16 -> (M, N) float32 with float32 accumulation: one cuBLAS bf16 GEMM with
    float32 output on CUDA (torch with ``out_dtype``), elsewhere the same products in float32."""
    if a.is_cuda and GEMM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # bf16 values are exact in float32, so are their products


def similarity(query: torch.Tensor, rows: torch.Tensor, kind: str = "dot", *, bf16: bool | None = None,
               split_query: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scores of every query against every row: query (Q, D), rows (C, D) for "dot" or (C, T, D) for
    "max_token" -> (Q, C) in ``dtype`` (float64 for a reference computation). ``bf16`` (None: CUDA with a bf16
    gallery) scores on bf16 tensor cores; ``split_query`` is ``split_bf16(query)``, reused over many chunks."""
    if bf16 is None:
        bf16 = use_bf16_scoring(query, rows)
    if bf16:
        q3 = split_bf16(query) if split_query is None else split_query  # (Q, 3D)
        g = rows.to(torch.bfloat16)
        g3 = g.reshape(-1, g.shape[-1]).repeat(1, 3)  # (C*T, 3D): [g, g, g] against [hi, mid, lo]
        scores = mm_fp32_out(q3, g3.T)  # (Q, 3D) @ (3D, C*T) -> (Q, C*T) float32
    else:
        q, g = query.to(dtype), rows.to(dtype)
        scores = q @ g.reshape(-1, g.shape[-1]).T  # (Q, D) @ (D, C*T) -> (Q, C*T)
    if kind == "dot":
        return scores
    return scores.view(query.shape[0], rows.shape[0], rows.shape[1]).amax(dim=2)  # (Q, C, T) -> (Q, C)


def scores_of_rows(query: torch.Tensor, gallery: torch.Tensor, rows: torch.Tensor, kind: str = "dot",
                   bf16: bool = False) -> torch.Tensor:
    """Paired scores: query i against gallery rows ``rows[i, j]``. query (Q, D); rows (Q, S) valid rows
    -> (Q, S) float32, the same products as :func:`similarity` (split query with ``bf16``)."""
    q, g = (split_bf16(query) if bf16 else query).float(), gallery[rows].float()  # (Q, [3]D), (Q, S, [T,] D)
    if bf16:
        g = g.repeat(*([1] * (g.dim() - 1)), 3)  # (Q, S, 3D) or (Q, S, T, 3D)
    if kind == "dot":
        return torch.einsum("qd,qsd->qs", q, g)
    return torch.einsum("qd,qstd->qst", q, g).amax(dim=2)


def mask_rows_(scores: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """Set scores[i, rows[i, j] - start] to the lowest value (-inf, or int64 min for order keys) for rows inside
    the chunk; in place, no host sync. scores (Qb, C); rows (Qb, K) int64, -1 padded, any gallery rows (rows
    outside [start, start + C) scatter the highest value into an amin: no change)."""
    c, local = scores.shape[1], rows - start  # local (Qb, K)
    inside = (rows >= 0) & (local >= 0) & (local < c)
    info = None if scores.is_floating_point() else torch.iinfo(scores.dtype)
    low, high = (float("-inf"), float("inf")) if info is None else (info.min, info.max)
    src = torch.full(rows.shape, high, dtype=scores.dtype, device=scores.device).masked_fill_(inside, low)
    return scores.scatter_reduce_(1, local.clamp(0, c - 1), src, reduce="amin")
