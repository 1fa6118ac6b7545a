"""The Triton backend of the bank-softmax statistics (``bank_contrastive_loss(..., backend="triton")``).

The kernel streams the bank once and returns, per query, the statistics of
:class:`~cir_plugins.negatives.core.BankStats` (max logit ``m``, ``z = sum exp(l - m)``,
``t = sum exp(l - m) s``, ``w = sum exp(l - m) b``). Each program owns a block of queries, one
split of the bank rows and one chunk of the embedding columns, and keeps the online running state;
the per-split partials are merged by ``BankStats.combine`` (a (S, B, D) reduction, tiny next to the
bank). Parallelism comes from splitting N (B is small, N is huge). Row offsets are computed in
int64 so banks with more than 2**31 elements work. The loss, the target term and the backward are
the library's one implementation in :mod:`cir_plugins.negatives.core`.

Precision: logits and all accumulators are float32. For a bf16/fp16 bank and a float32 query the
query is split into ``hi + lo`` halves in the bank's dtype and both are multiplied (likewise the
softmax weights in the ``w`` update), which keeps the products as exact as a float32 matmul over
the same bank values while still running on the half-precision tensor cores (``precision="exact"``,
the default). ``precision="fast"`` rounds the query and the weights once to the bank's dtype (half
the tensor-core work). A float32 bank is multiplied in IEEE float32.

``precision="two_pass"`` rounds like "fast" but splits the work in two passes so that each logit tile
is computed once per pass instead of once per column chunk of ``w``: pass 1 is the kernel without
the ``w`` accumulator (max, normaliser and ``t`` only); pass 2 recomputes the logits chunk by chunk
of the bank (``softmax_weights_kernel``), writes the chunk's softmax weights ``exp(l - m)`` in the
bank's dtype (a (B, chunk * T) block of ``TWO_PASS_CHUNK_BYTES``) and lets one cuBLAS GEMM with float32
accumulation add them up against the chunk (batched over slices of ``TWO_PASS_GEMM_SLICE`` bank rows,
so the small (B, D) output still fills the GPU). About three B x N x D products in all against the
single-pass kernel's (column chunks) x (1 or 2) x 2.

Multi-vector banks (N, T, D), score = max over the T tokens: the same kernel loops over the
tokens of each bank tile, keeps the best score and the winning token per (query, row), and adds
each row's winning token to ``w`` (one masked product per token), so the batch is never looped
over in Python.

Public names: :func:`fused_available` ``(query, bank, similarity="dot") -> bool`` and
:func:`bank_partials`, the statistics on inputs that ``bank_contrastive_loss(..., backend="triton")``
has validated (``tiles`` overrides the tile sizes for benchmarks/fused_tune.py).

The jit kernels live in :mod:`cir_plugins.negatives.fused_kernels`; this module is their host side.

Set the environment variable ``CIR_PLUGINS_DISABLE_FUSED=1`` to make :func:`fused_available`
return False (the chunked PyTorch path is then used).
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import ConfigError, explain
from ..similarity import mm_fp32_out
from .core import BankStats
from .fused_kernels import OUT_OF_RESOURCES, triton

if triton is not None:  # the jit kernels exist only where triton imported
    from .fused_kernels import bank_partials_kernel, softmax_weights_kernel

logger = logging.getLogger(__name__)

__all__ = ["bank_partials", "fused_available", "tile_config", "triton_importable"]

_BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)



def triton_importable() -> bool:
    """True when ``triton`` imported cleanly in this process."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_available(query: torch.Tensor, bank: torch.Tensor, similarity: str = "dot") -> bool:
    """Whether the fused kernel can run on these tensors.

    True when both are CUDA tensors (CPU ones under ``TRITON_INTERPRET=1``) on the same device, triton is
    importable, ``query`` is (B, D) and ``bank`` is (N, D) for ``similarity="dot"`` (or (N, T, D) for
    ``"max_token"``) with the same D, bank and query are float32/bf16/fp16, and ``CIR_PLUGINS_DISABLE_FUSED``
    is not set. Never raises.
    """
    if os.environ.get("CIR_PLUGINS_DISABLE_FUSED", "0") not in ("", "0"):
        return False
    if triton is None:
        return False
    if not (isinstance(query, torch.Tensor) and isinstance(bank, torch.Tensor)):
        return False
    if query.device != bank.device or not (query.is_cuda or _interpreting()):  # the interpreter runs on CPU
        return False
    want = {"dot": 2, "max_token": 3}.get(similarity)
    if query.dim() != 2 or bank.dim() != want or query.shape[1] != bank.shape[-1]:
        return False
    if bank.dtype not in _BANK_DTYPES or query.dtype not in _BANK_DTYPES:
        return False
    return query.shape[0] > 0 and bank.shape[0] > 0 and query.shape[1] > 0 and bank.numel() > 0


def _pow2(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())


_TILE_KEYS = ("BLOCK_B", "BLOCK_N", "BLOCK_K", "BLOCK_DV", "num_warps", "num_stages", "programs_per_sm")


def _check_tiles(tiles: dict) -> None:
    """Tile overrides: known keys; block sizes powers of two >= 16; warps a power of two 1..32; stages and
    programs per SM positive ints (num_stages may be None)."""
    unknown = sorted(set(tiles) - set(_TILE_KEYS))
    if unknown:
        raise ConfigError(explain("unknown tile settings", got=unknown, expected=_TILE_KEYS))
    for key, value in tiles.items():
        if key == "num_stages" and value is None:
            continue
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if key.startswith("BLOCK_"):
            ok = ok and value >= 16 and value & (value - 1) == 0
            expected = "a power of two >= 16"
        elif key == "num_warps":
            ok = ok and value <= 32 and value & (value - 1) == 0
            expected = "1, 2, 4, 8, 16 or 32"
        else:
            expected = "an int >= 1" + (" or None" if key == "num_stages" else "")
        if not ok:
            raise ConfigError(explain(f"bad tile setting {key}", got=value, expected=expected))


def tile_config(b: int, n: int, d: int, device: torch.device, tiles: dict | None = None, need_w: bool = True) -> dict:
    """Tile sizes and the number of bank splits; ``tiles`` overrides any of ``_TILE_KEYS``. Without ``w``
    there are no column chunks (one program per query block and split)."""
    tiles = dict(tiles or {})
    _check_tiles(tiles)
    if _interpreting() or device.type != "cuda":
        # the interpreter runs numpy per program: small tiles, few programs
        block_b = tiles.get("BLOCK_B", 16)
        block_n, block_k = 32, 32
        block_dv = min(64, max(16, _pow2(d)))
        programs_per_sm, sms = 4, 1
        num_warps = 4
    else:
        # measured on an H200 (benchmarks/fused_tune.py, B=256 D=768 N=1M, bf16 bank): 128 queries with 8
        # warps was the fastest of the 18 settings measured for both precisions (8.1 ms exact, 6.1 ms fast,
        # against 29.1 / 9.9 ms for the former 64 queries with 8 warps); 64 queries want 4 warps
        block_b = tiles.get("BLOCK_B", 128 if b > 64 else (64 if b > 32 else (32 if b > 16 else 16)))
        block_n, block_k = 64, 64
        block_dv = min(256, max(16, _pow2(d)))
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs_per_sm = 4
        num_warps = 8 if block_b >= 128 else 4  # from the (possibly overridden) query tile
    block_n = tiles.get("BLOCK_N", block_n)
    block_k = tiles.get("BLOCK_K", block_k)
    block_dv = tiles.get("BLOCK_DV", block_dv)
    num_warps = tiles.get("num_warps", num_warps)
    target_programs = tiles.get("programs_per_sm", programs_per_sm) * sms
    num_qb = triton.cdiv(b, block_b)
    num_dv = triton.cdiv(d, block_dv) if need_w else 1
    num_stages = tiles.get("num_stages")
    n_tiles = triton.cdiv(n, block_n)
    splits = max(1, min(n_tiles, triton.cdiv(target_programs, num_qb * num_dv)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    return dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_DV=block_dv, NUM_DV=num_dv, num_qb=num_qb,
                splits=splits, tiles_per_split=tiles_per_split, num_warps=num_warps, num_stages=num_stages)


def _launch_partials(query, bank, temperature, exclude_rows, *, need_w: bool, precision: str, tiles=None):
    """Run the kernel; returns the per-split partials m, z, t (S, B) and w (S, B, D) or None.

    bank (N, D) for dot similarity, (N, T, D) for max over tokens.
    """
    bsz, dim = query.shape
    n = bank.shape[0]
    multi = bank.dim() == 3
    tokens = bank.shape[1] if multi else 1
    bank = bank.contiguous()
    cfg = tile_config(bsz, n, dim, bank.device, tiles, need_w)
    ieee = bank.dtype == torch.float32
    qh, ql, split_q = _query_halves(query, bank.dtype, precision)
    split_p = (not ieee) and precision == "exact"
    excl, k = _exclusions(exclude_rows, bank.device)
    tau = temperature.detach().reshape(()).float().contiguous()

    def run(cfg):
        s = cfg["splits"]
        m = torch.empty((s, bsz), dtype=torch.float32, device=bank.device)
        z = torch.empty_like(m)
        t = torch.empty_like(m)
        w = torch.empty((s, bsz, dim) if need_w else (1,), dtype=torch.float32, device=bank.device)
        grid = (cfg["num_qb"] * cfg["NUM_DV"], s)
        launch = {"num_warps": cfg["num_warps"]}
        if cfg["num_stages"] is not None:
            launch["num_stages"] = cfg["num_stages"]
        bank_partials_kernel[grid](
            qh, ql, bank, excl, tau, m, z, t, w, bsz, n, dim, tokens, cfg["tiles_per_split"], K=k, MULTI=multi,
            SPLIT_Q=split_q, SPLIT_P=split_p, NEED_W=need_w, IEEE=ieee,
            # the interpreter mis-multiplies bf16 tl.dot operands: multiply their exact float32 values
            UPCAST=_interpreting() and bank.dtype == torch.bfloat16,
            **{key: cfg[key] for key in ("BLOCK_B", "BLOCK_N", "BLOCK_K", "BLOCK_DV", "NUM_DV")}, **launch)
        return m, z, t, (w if need_w else None)

    try:
        return run(cfg)
    except OUT_OF_RESOURCES as exc:
        # the built-in 128-query tiles were tuned on an H200 (232 KB of shared memory per block); a GPU
        # with less gets the 64-query tiles, which need about half
        if tiles is not None or cfg["BLOCK_B"] <= 64:
            raise
        logger.warning("fused bank loss: %s; falling back to 64-query tiles", str(exc).splitlines()[0])
        return run(tile_config(bsz, n, dim, bank.device, {"BLOCK_B": 64}, need_w))


def _query_halves(query, dtype, precision):
    """The query in the bank's dtype (hi), its rounding residue (lo; hi again when unused) and whether lo is
    used: only for precision "exact" with a float32 query over a half bank."""
    q32 = query.detach().float()
    qh = q32.to(dtype).contiguous()  # (B, D)
    split_q = dtype != torch.float32 and precision == "exact" and query.dtype == torch.float32
    ql = (q32 - qh.float()).to(dtype).contiguous() if split_q else qh
    return qh, ql, split_q


def _exclusions(exclude_rows, device):
    """(B, K) int64 contiguous exclusions and K; a 1-element dummy and K = 0 when there are none."""
    if exclude_rows is not None and exclude_rows.shape[1] > 0:
        return exclude_rows.to(device=device, dtype=torch.int64).contiguous(), int(exclude_rows.shape[1])
    return torch.full((1,), -1, dtype=torch.int64, device=device), 0


# Bytes of pass 2's softmax-weight block (B, chunk * T) in the bank's dtype (precision "two_pass"): the
# extra memory of that pass, and the size of each cuBLAS GEMM that accumulates the query gradient.
TWO_PASS_CHUNK_BYTES = 64 << 20
# Columns of the weight block per slice of that GEMM: the (B, chunk) x (chunk, D) product is cut along the
# chunk into slices multiplied as one batched GEMM and summed (split-K), so the small (B, D) output still
# spreads over every SM; 0 = one plain GEMM per chunk.
TWO_PASS_GEMM_SLICE = 8192
# torch.bmm(..., out_dtype=) exists in recent torch only; without it each chunk is one plain GEMM
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def _bmm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(S, M, K) @ (S, K, N) half -> (S, M, N) float32 with float32 accumulation; on the CPU the same products
    in float32 (half values are exact in float32)."""
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _weighted_chunk_sum(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """p (B, K) weights @ g (K, D) bank vectors -> (B, D) float32, split along K by TWO_PASS_GEMM_SLICE."""
    if p.dtype == torch.float32:
        return p @ g
    size = TWO_PASS_GEMM_SLICE
    slices = p.shape[1] // size if size else 0
    if slices < 2 or (p.is_cuda and not _BMM_OUT_DTYPE):
        return mm_fp32_out(p, g)
    whole = slices * size
    a = p[:, :whole].unflatten(1, (slices, size)).transpose(0, 1)  # (S, B, size), a strided view
    out = _bmm_fp32_out(a, g[:whole].view(slices, size, g.shape[1])).sum(0)  # (S, B, D) -> (B, D)
    if whole < p.shape[1]:
        out += mm_fp32_out(p[:, whole:], g[whole:])
    return out


def _weights_config(b: int, device: torch.device, tiles: dict | None = None) -> dict:
    """Tiles of pass 2 (one program per (query block, BLOCK_N rows)); ``tiles`` overrides BLOCK_B, BLOCK_N,
    BLOCK_K, num_warps, num_stages (programs_per_sm and BLOCK_DV mean nothing here)."""
    tiles = dict(tiles or {})
    _check_tiles(tiles)
    if _interpreting() or device.type != "cuda":
        cfg = dict(BLOCK_B=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    else:  # untuned first choice: 128 x 128 output tiles (benchmarks/bank_loss_gpu.py --two-pass-tiles sweeps it)
        block_b = 128 if b > 64 else (64 if b > 32 else (32 if b > 16 else 16))
        cfg = dict(BLOCK_B=block_b, BLOCK_N=128, BLOCK_K=64, num_warps=8 if block_b >= 128 else 4)
    keys = ("BLOCK_B", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    cfg.update({key: tiles[key] for key in keys if key in tiles})
    return cfg


def _two_pass_weighted_sum(query, bank, temperature, exclude_rows, m, *, tiles=None):
    """w = sum_j exp(l_j - m) g_j (B, D) float32 for precision "two_pass", chunk by chunk of the bank: the
    kernel writes a chunk's softmax weights in the bank's dtype, one GEMM (float32 accumulation) adds
    them up against the chunk. ``m`` (B,) float32 the max logit from pass 1 (same query rounding)."""
    bsz, dim = query.shape
    n = bank.shape[0]
    multi = bank.dim() == 3
    tokens = bank.shape[1] if multi else 1
    bank = bank.contiguous()
    cfg = _weights_config(bsz, bank.device, tiles)
    qh, _, _ = _query_halves(query, bank.dtype, "fast")
    excl, k = _exclusions(exclude_rows, bank.device)
    tau = temperature.detach().reshape(()).float().contiguous()
    m = m.float().contiguous()
    rows = TWO_PASS_CHUNK_BYTES // (bsz * tokens * bank.element_size())
    rows = min(max(cfg["BLOCK_N"], rows // cfg["BLOCK_N"] * cfg["BLOCK_N"]), n)
    weights = torch.empty((bsz, rows * tokens), dtype=bank.dtype, device=bank.device)
    flat = bank.view(n * tokens, dim)
    w = torch.zeros((bsz, dim), dtype=torch.float32, device=bank.device)
    launch = {"num_warps": cfg["num_warps"]}
    if cfg.get("num_stages") is not None:
        launch["num_stages"] = cfg["num_stages"]
    for start in range(0, n, rows):
        c = min(rows, n - start)
        num_qb = triton.cdiv(bsz, cfg["BLOCK_B"])
        grid = (triton.cdiv(c, cfg["BLOCK_N"]) * num_qb,)
        softmax_weights_kernel[grid](
            qh, bank, excl, tau, m, weights, bsz, n, dim, tokens, start, c, weights.stride(0), num_qb, K=k,
            MULTI=multi,
            IEEE=bank.dtype == torch.float32, UPCAST=_interpreting() and bank.dtype == torch.bfloat16,
            BLOCK_B=cfg["BLOCK_B"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **launch)
        p = weights[:, :c * tokens]  # (B, C*T)
        g = flat[start * tokens:(start + c) * tokens]  # (C*T, D)
        w += _weighted_chunk_sum(p, g)
    return w


def bank_partials(query, bank, temperature, exclude_rows=None, *, need_w=True, precision="exact",
                  tiles=None, weight_tiles=None) -> BankStats:
    """The Triton backend of the bank statistics on inputs the loss has validated: the
    kernel's per-split partials merged by :meth:`BankStats.combine`. float32, no autograd history."""
    with torch.no_grad():
        if precision != "two_pass":
            m, z, t, w = _launch_partials(query, bank, temperature, exclude_rows, need_w=need_w, precision=precision,
                                          tiles=tiles)
            return BankStats(m, z, t, w).combine()
        # pass 1: the fused product and online logsumexp only (one program per query block and split)
        m, z, t, _ = _launch_partials(query, bank, temperature, exclude_rows, need_w=False, precision="fast",
                                      tiles=tiles)
        stats = BankStats(m, z, t, None).combine()
        if need_w:  # pass 2: the logits again, chunk by chunk, into bf16 weights and one GEMM per chunk
            stats.w = _two_pass_weighted_sum(query, bank, temperature, exclude_rows, stats.m, tiles=weight_tiles)
        return stats
