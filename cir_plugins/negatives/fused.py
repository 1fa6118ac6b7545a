"""The Triton backend of the bank-softmax statistics (``bank_contrastive_loss(..., backend="triton")``), host side.

The kernel (:mod:`cir_plugins.negatives.fused_kernels`) streams the bank once and returns, per query, the
:class:`~cir_plugins.negatives.core.BankStats`. Each program owns a block of queries, one split of the bank rows (N
is huge, B small) and one chunk of the embedding columns; ``BankStats.combine`` merges the splits. Row offsets are
int64. A multi-vector bank (N, T, D) keeps the best token per (query, row) and adds that token to ``w``.

Precision: logits and accumulators are float32; a float32 bank is multiplied in IEEE float32. For a bf16/fp16 bank,
``"exact"`` (default) splits a float32 query (and the softmax weights of the ``w`` update) into ``hi + lo`` halves
in the bank's dtype and multiplies both (a float32 matmul's accuracy on the half tensor cores); ``"fast"`` rounds
them once to the bank's dtype; ``"two_pass"`` rounds like "fast" and computes each logit tile once per pass instead
of once per column chunk of ``w``: pass 1 is the kernel without ``w``, pass 2 (``softmax_weights_kernel``) writes
each bank chunk's softmax weights in the bank's dtype and one float32-accumulating GEMM adds them up.

``CIR_PLUGINS_DISABLE_FUSED=1`` makes :func:`fused_available` return False (the torch backend is then used).
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import ConfigError, explain
from ..similarity import GEMM_OUT_DTYPE, mm_fp32_out
from .core import BankStats
from .fused_kernels import OUT_OF_RESOURCES, TRITON_ERROR, triton

if triton is not None:  # the jit kernels exist only where triton imported
    from .fused_kernels import bank_partials_kernel, softmax_weights_kernel

logger = logging.getLogger(__name__)

__all__ = ["bank_partials", "fused_available", "tile_config", "TRITON_ERROR"]

_BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_available(query: torch.Tensor, bank: torch.Tensor, similarity: str = "dot") -> bool:
    """Whether the fused kernel can run on these tensors (never raises): both CUDA tensors (CPU ones under
    ``TRITON_INTERPRET=1``) on one device, triton importable, ``query`` (B, D) and ``bank`` (N, D) for "dot" or
    (N, T, D) for "max_token" with the same D, both float32/bf16/fp16, ``CIR_PLUGINS_DISABLE_FUSED`` not set."""
    if os.environ.get("CIR_PLUGINS_DISABLE_FUSED", "0") not in ("", "0") or triton is None:
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
    """ConfigError unless every tile override is a known key with a valid value."""
    unknown = sorted(set(tiles) - set(_TILE_KEYS))
    if unknown:
        raise ConfigError(explain("unknown tile settings", got=unknown, expected=_TILE_KEYS))
    for key, value in tiles.items():
        if key == "num_stages" and value is None:
            continue
        block, warps = key.startswith("BLOCK_"), key == "num_warps"
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= (16 if block else 1)
        if not ok or ((block or warps) and value & (value - 1)) or (warps and value > 32):
            expected = "a power of two >= 16" if block else "1, 2, 4, 8, 16 or 32" if warps else "an int >= 1"
            raise ConfigError(explain(f"bad tile setting {key}", got=value,
                                      expected=expected + (" or None" if key == "num_stages" else "")))


def tile_config(b: int, n: int, d: int, device: torch.device, tiles: dict | None = None, need_w: bool = True) -> dict:
    """Tile sizes and the number of bank splits; ``tiles`` overrides any of ``_TILE_KEYS`` (block sizes powers of two
    >= 16, num_warps 1..32, the rest ints >= 1, num_stages also None). Without ``w`` there are no column chunks."""
    tiles = dict(tiles or {})
    _check_tiles(tiles)
    if _interpreting() or device.type != "cuda":
        # the interpreter runs numpy per program: small tiles, few programs
        block_b, block_n, block_k, block_dv = tiles.get("BLOCK_B", 16), 32, 32, min(64, max(16, _pow2(d)))
        programs_per_sm, sms, num_warps = 4, 1, 4
    else:
        # benchmarks/fused_tune.py on an H200 (B=256 D=768 N=1M, bf16 bank): 128 queries with 8 warps was the fastest
        # of 18 settings for both precisions (8.1 ms exact, 6.1 ms fast); 64 queries want 4 warps
        block_b = tiles.get("BLOCK_B", 128 if b > 64 else (64 if b > 32 else (32 if b > 16 else 16)))
        block_n, block_k, block_dv = 64, 64, min(256, max(16, _pow2(d)))
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs_per_sm, num_warps = 4, 8 if block_b >= 128 else 4  # from the (possibly overridden) query tile
    block_n, block_k = tiles.get("BLOCK_N", block_n), tiles.get("BLOCK_K", block_k)
    block_dv = tiles.get("BLOCK_DV", block_dv)
    target_programs = tiles.get("programs_per_sm", programs_per_sm) * sms
    num_qb, num_dv = triton.cdiv(b, block_b), triton.cdiv(d, block_dv) if need_w else 1
    n_tiles = triton.cdiv(n, block_n)
    splits = max(1, min(n_tiles, triton.cdiv(target_programs, num_qb * num_dv)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    return dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_DV=block_dv, NUM_DV=num_dv, num_qb=num_qb,
                splits=splits, tiles_per_split=tiles_per_split, num_warps=tiles.get("num_warps", num_warps),
                num_stages=tiles.get("num_stages"))


def _launch_partials(query, bank, temperature, exclude_rows, *, need_w: bool, precision: str, tiles=None):
    """Run the kernel on bank (N, D) or (N, T, D): the per-split partials m, z, t (S, B) and w (S, B, D) or None."""
    bank, bsz, dim, n, tokens, excl, k, tau = _operands(query, bank, temperature, exclude_rows)
    cfg = tile_config(bsz, n, dim, bank.device, tiles, need_w)
    ieee = bank.dtype == torch.float32
    qh, ql, split_q = _query_halves(query, bank.dtype, precision)

    def run(cfg):
        m, z, t = torch.empty((3, cfg["splits"], bsz), dtype=torch.float32, device=bank.device)
        w = torch.empty((cfg["splits"], bsz, dim) if need_w else (1,), dtype=torch.float32, device=bank.device)
        bank_partials_kernel[(cfg["num_qb"] * cfg["NUM_DV"], cfg["splits"])](
            qh, ql, bank, excl, tau, m, z, t, w, bsz, n, dim, tokens, cfg["tiles_per_split"], K=k,
            MULTI=bank.dim() == 3, SPLIT_Q=split_q, SPLIT_P=not ieee and precision == "exact", NEED_W=need_w,
            IEEE=ieee, UPCAST=_upcast(bank), **_launch(cfg),
            **{key: cfg[key] for key in ("BLOCK_B", "BLOCK_N", "BLOCK_K", "BLOCK_DV", "NUM_DV")})
        return m, z, t, (w if need_w else None)

    try:
        return run(cfg)
    except OUT_OF_RESOURCES as exc:
        # the 128-query tiles were tuned on an H200 (232 KB of shared memory per block); the 64-query ones need half
        if tiles is not None or cfg["BLOCK_B"] <= 64:
            raise
        logger.warning("fused bank loss: %s; falling back to 64-query tiles", str(exc).splitlines()[0])
        return run(tile_config(bsz, n, dim, bank.device, {"BLOCK_B": 64}, need_w))


def _query_halves(query, dtype, precision):
    """(hi, lo, split_q): the query in the bank's dtype and its rounding residue (used for "exact" only)."""
    q32 = query.detach().float()
    qh = q32.to(dtype).contiguous()  # (B, D)
    split_q = dtype != torch.float32 and precision == "exact" and query.dtype == torch.float32
    ql = (q32 - qh.float()).to(dtype).contiguous() if split_q else qh
    return qh, ql, split_q


def _operands(query, bank, temperature, exclude_rows):
    """(contiguous bank, B, D, N, T (1 for dot), (B, K) int64 exclusions (a 1-element dummy when none), K, tau)."""
    bank = bank.contiguous()
    if exclude_rows is not None and exclude_rows.shape[1] > 0:
        excl, k = exclude_rows.to(device=bank.device, dtype=torch.int64).contiguous(), int(exclude_rows.shape[1])
    else:
        excl, k = torch.full((1,), -1, dtype=torch.int64, device=bank.device), 0
    tau = temperature.detach().reshape(()).float().contiguous()
    return bank, *query.shape, bank.shape[0], bank.shape[1] if bank.dim() == 3 else 1, excl, k, tau


def _upcast(bank):
    """The interpreter mis-multiplies bf16 tl.dot operands: multiply their exact float32 values there."""
    return _interpreting() and bank.dtype == torch.bfloat16


def _launch(cfg):
    """The launch options of a tile config: num_warps, and num_stages when set."""
    stages = cfg.get("num_stages")
    return {"num_warps": cfg["num_warps"]} | ({} if stages is None else {"num_stages": stages})


# Bytes of pass 2's softmax-weight block (B, chunk * T) in the bank's dtype (precision "two_pass"): that pass's
# extra memory, and the size of each cuBLAS GEMM that accumulates the query gradient.
TWO_PASS_CHUNK_BYTES = 64 << 20
# Columns per slice of that GEMM: the (B, chunk) x (chunk, D) product is cut along the chunk into slices multiplied
# as one batched GEMM and summed (split-K), so the small (B, D) output spreads over every SM; 0 = one plain GEMM.
TWO_PASS_GEMM_SLICE = 8192


def _weighted_chunk_sum(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """p (B, K) weights @ g (K, D) bank vectors -> (B, D) float32, split along K by TWO_PASS_GEMM_SLICE."""
    if p.dtype == torch.float32:
        return p @ g
    size = TWO_PASS_GEMM_SLICE
    slices = p.shape[1] // size if size else 0
    if slices < 2 or (p.is_cuda and not GEMM_OUT_DTYPE):
        return mm_fp32_out(p, g)
    whole = slices * size
    a = p[:, :whole].unflatten(1, (slices, size)).transpose(0, 1)  # (S, B, size), a strided view
    b = g[:whole].view(slices, size, g.shape[1])
    # float32 accumulation; on the CPU the same products in float32 (half values are exact in float32)
    out = (torch.bmm(a, b, out_dtype=torch.float32) if p.is_cuda else torch.bmm(a.float(), b.float())).sum(0)
    if whole < p.shape[1]:
        out += mm_fp32_out(p[:, whole:], g[whole:])
    return out


def _weights_config(b: int, device: torch.device, tiles: dict | None = None) -> dict:
    """Pass 2's tiles (a program per query block and BLOCK_N rows); ``tiles`` overrides them."""
    tiles = dict(tiles or {})
    _check_tiles(tiles)
    if _interpreting() or device.type != "cuda":
        cfg = dict(BLOCK_B=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    else:  # untuned first choice: 128 x 128 output tiles (benchmarks/bank_loss_gpu.py --two-pass-tiles sweeps it)
        block_b = 128 if b > 64 else (64 if b > 32 else (32 if b > 16 else 16))
        cfg = dict(BLOCK_B=block_b, BLOCK_N=128, BLOCK_K=64, num_warps=8 if block_b >= 128 else 4)
    keys = ("BLOCK_B", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return cfg | {key: tiles[key] for key in keys if key in tiles}


def _two_pass_weighted_sum(query, bank, temperature, exclude_rows, m, *, tiles=None):
    """Pass 2 of "two_pass": w (B, D) float32, chunk by chunk, from pass 1's max logit ``m`` (B,)."""
    bank, bsz, dim, n, tokens, excl, k, tau = _operands(query, bank, temperature, exclude_rows)
    cfg = _weights_config(bsz, bank.device, tiles)
    qh, _, _ = _query_halves(query, bank.dtype, "fast")
    m = m.float().contiguous()
    rows = TWO_PASS_CHUNK_BYTES // (bsz * tokens * bank.element_size())
    rows = min(max(cfg["BLOCK_N"], rows // cfg["BLOCK_N"] * cfg["BLOCK_N"]), n)
    weights = torch.empty((bsz, rows * tokens), dtype=bank.dtype, device=bank.device)
    flat = bank.view(n * tokens, dim)
    w = torch.zeros((bsz, dim), dtype=torch.float32, device=bank.device)
    num_qb = triton.cdiv(bsz, cfg["BLOCK_B"])
    for start in range(0, n, rows):
        c = min(rows, n - start)
        softmax_weights_kernel[(triton.cdiv(c, cfg["BLOCK_N"]) * num_qb,)](
            qh, bank, excl, tau, m, weights, bsz, n, dim, tokens, start, c, weights.stride(0), num_qb, K=k,
            MULTI=bank.dim() == 3, IEEE=bank.dtype == torch.float32, UPCAST=_upcast(bank),
            BLOCK_B=cfg["BLOCK_B"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **_launch(cfg))
        # the chunk's weights (B, C*T) against its bank vectors (C*T, D), one GEMM
        w += _weighted_chunk_sum(weights[:, :c * tokens], flat[start * tokens:(start + c) * tokens])
    return w


def bank_partials(query, bank, temperature, exclude_rows=None, *, need_w=True, precision="exact",
                  tiles=None, weight_tiles=None) -> BankStats:
    """The Triton backend's :class:`BankStats` (float32, no autograd history) on inputs the loss has validated.
    ``tiles`` / ``weight_tiles`` override the tiles of the kernel / of pass 2 (benchmarks/fused_tune.py)."""
    with torch.no_grad():
        if precision != "two_pass":
            return BankStats(*_launch_partials(query, bank, temperature, exclude_rows, need_w=need_w,
                                               precision=precision, tiles=tiles)).combine()
        # pass 1: the fused product and online logsumexp only (one program per query block and split)
        m, z, t, _ = _launch_partials(query, bank, temperature, exclude_rows, need_w=False, precision="fast",
                                      tiles=tiles)
        stats = BankStats(m, z, t, None).combine()
        if need_w:  # pass 2: the logits again, chunk by chunk, into bf16 weights and one GEMM per chunk
            stats.w = _two_pass_weighted_sum(query, bank, temperature, exclude_rows, stats.m, tiles=weight_tiles)
        return stats
