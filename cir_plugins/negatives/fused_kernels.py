"""The Triton jit kernels of the fused bank-softmax statistics; :mod:`cir_plugins.negatives.fused` is their host
side and describes the algorithm. Without triton it defines no kernels, ``triton`` is None and ``TRITON_ERROR``
says why (the triton backend's refusal names it)."""

from __future__ import annotations

try:  # triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"


class _NoSuchError(Exception):
    """Stands for triton's OutOfResources where triton lacks it."""


try:
    from triton.runtime.errors import OutOfResources as OUT_OF_RESOURCES
except ImportError:  # pragma: no cover - no triton, or another layout
    OUT_OF_RESOURCES = _NoSuchError


if triton is not None:

    @triton.jit
    def _mm(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b in float32; UPCAST: in float32 (the interpreter mis-multiplies bf16)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _scores_tile(qh_ptr, ql_ptr, bank_ptr, row_off, n_ok, offs_b64, b_ok, D, offs_k,
                     SPLIT_Q: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_B, BLOCK_N) float32 q @ v^T for the vectors starting at bank_ptr + row_off (int64)."""
        s = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < D
            b_tile = tl.load(
                bank_ptr + row_off[None, :] + kk[:, None],
                mask=n_ok[None, :] & k_ok[:, None],
                other=0.0,
            )  # (BLOCK_K, BLOCK_N): the bank tile, transposed by addressing
            q_mask = b_ok[:, None] & k_ok[None, :]
            qh = tl.load(qh_ptr + offs_b64[:, None] * D + kk[None, :], mask=q_mask, other=0.0)
            s = _mm(qh, b_tile, s, IEEE, UPCAST)  # (BLOCK_B, BLOCK_K) x (BLOCK_K, BLOCK_N)
            if SPLIT_Q:
                ql = tl.load(ql_ptr + offs_b64[:, None] * D + kk[None, :], mask=q_mask, other=0.0)
                s = _mm(ql, b_tile, s, IEEE, UPCAST)
        return s

    @triton.jit
    def _row_scores(qh_ptr, ql_ptr, bank_ptr, row_off, n_ok, offs_b64, b_ok, D, T, offs_k,
                    MULTI: tl.constexpr, SPLIT_Q: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_B, BLOCK_N) float32 scores of a bank tile and, for MULTI, the winning token (else 0)."""
        best_t = tl.zeros((BLOCK_B, BLOCK_N), tl.int32)
        if MULTI:
            # s = max over the T tokens of q . v_t, remembering the winning token
            s = tl.full((BLOCK_B, BLOCK_N), float("-inf"), tl.float32)
            for tok in range(0, T):
                s_t = _scores_tile(qh_ptr, ql_ptr, bank_ptr, row_off + tok * D, n_ok, offs_b64, b_ok, D, offs_k,
                                   SPLIT_Q, IEEE, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K)
                better = s_t > s
                s = tl.where(better, s_t, s)
                best_t = tl.where(better, tok, best_t)
        else:
            s = _scores_tile(qh_ptr, ql_ptr, bank_ptr, row_off, n_ok, offs_b64, b_ok, D, offs_k,
                             SPLIT_Q, IEEE, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K)
        return s, best_t

    @triton.jit
    def _keep_mask(excl_ptr, offs_b64, b_ok, offs_n, n_ok, K: tl.constexpr):
        """(BLOCK_B, BLOCK_N) True where the (query, row) pair is in range and not excluded."""
        keep = n_ok[None, :] & b_ok[:, None]
        for k in tl.static_range(K):
            ex = tl.load(excl_ptr + offs_b64 * K + k, mask=b_ok, other=-1)  # (BLOCK_B,)
            keep = keep & (offs_n[None, :] != ex[:, None])
        return keep

    @triton.jit
    def _weighted_sum(acc, p, bank_ptr, row_off, n_ok, offs_dv, dv_ok,
                      SPLIT_P: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc (BLOCK_B, BLOCK_DV) + p @ v[:, chunk] for the vectors at bank_ptr + row_off."""
        bv = tl.load(
            bank_ptr + row_off[:, None] + offs_dv[None, :],
            mask=n_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_DV)
        if IEEE:
            acc = _mm(p, bv, acc, IEEE, UPCAST)  # (BLOCK_B, BLOCK_N) x (BLOCK_N, BLOCK_DV)
        else:
            p_hi = p.to(bv.dtype)
            acc = _mm(p_hi, bv, acc, IEEE, UPCAST)
            if SPLIT_P:
                p_lo = (p - p_hi.to(tl.float32)).to(bv.dtype)  # rounding residue of the weights
                acc = _mm(p_lo, bv, acc, IEEE, UPCAST)
        return acc

    @triton.jit
    def bank_partials_kernel(
        qh_ptr, ql_ptr,  # (B, D) query in the bank's dtype: hi half, and lo half (only read when SPLIT_Q)
        bank_ptr,  # (N, D), or (N, T, D) when MULTI; contiguous
        excl_ptr,  # (B, K) int64, -1 padded (only read when K > 0)
        tau_ptr,  # 0-dim float32
        m_out, z_out, t_out,  # (S, B) float32 each
        w_out,  # (S, B, D) float32
        B, N, D, T, tiles_per_split,
        K: tl.constexpr, MULTI: tl.constexpr, SPLIT_Q: tl.constexpr, SPLIT_P: tl.constexpr, NEED_W: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    ):
        # id 0: (query block, column chunk), fastest, so programs reading the same rows share L2; id 1: the split
        pid0 = tl.program_id(0)
        split = tl.program_id(1)
        qblock = pid0 // NUM_DV
        dv = pid0 % NUM_DV

        offs_b = qblock * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        b_ok = offs_b < B
        offs_b64 = offs_b.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        offs_dv = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < D

        inv_tau = 1.0 / tl.load(tau_ptr).to(tl.float32)

        m_i = tl.full((BLOCK_B,), -1.0e30, tl.float32)
        z_i = tl.zeros((BLOCK_B,), tl.float32)
        t_i = tl.zeros((BLOCK_B,), tl.float32)
        w_acc = tl.zeros((BLOCK_B, BLOCK_DV), tl.float32)

        # int64 row arithmetic: split * tiles * BLOCK_N * D exceeds 2**31 for big banks
        split_start = split.to(tl.int64) * tiles_per_split * BLOCK_N
        for tile in range(0, tiles_per_split):
            offs_n = split_start + tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
            n_ok = offs_n < N
            row_off = offs_n * T * D  # (BLOCK_N,) int64 element offset of each row
            s, best_t = _row_scores(qh_ptr, ql_ptr, bank_ptr, row_off, n_ok, offs_b64, b_ok, D, T, offs_k,
                                    MULTI, SPLIT_Q, IEEE, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K)
            keep = _keep_mask(excl_ptr, offs_b64, b_ok, offs_n, n_ok, K)  # (BLOCK_B, BLOCK_N)
            logits = tl.where(keep, s * inv_tau, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(logits - m_new[:, None])  # 0 where masked
            z_i = z_i * alpha + tl.sum(p, axis=1)
            t_i = t_i * alpha + tl.sum(p * s, axis=1)
            if NEED_W:
                w_acc = w_acc * alpha[:, None]  # rescale to the new running max, then accumulate in place
                if MULTI:
                    # each (query, row) pair weights only its winning token: one product per token
                    for tok in range(0, T):
                        p_t = tl.where(best_t == tok, p, 0.0)
                        w_acc = _weighted_sum(w_acc, p_t, bank_ptr, row_off + tok * D, n_ok, offs_dv, dv_ok,
                                              SPLIT_P, IEEE, UPCAST)
                else:
                    w_acc = _weighted_sum(w_acc, p, bank_ptr, row_off, n_ok, offs_dv, dv_ok, SPLIT_P, IEEE, UPCAST)
            m_i = m_new

        out_b = split.to(tl.int64) * B + offs_b64  # (BLOCK_B,) index into (S, B)
        if dv == 0:
            tl.store(m_out + out_b, m_i, mask=b_ok)
            tl.store(z_out + out_b, z_i, mask=b_ok)
            tl.store(t_out + out_b, t_i, mask=b_ok)
        if NEED_W:
            tl.store(
                w_out + out_b[:, None] * D + offs_dv[None, :],
                w_acc,
                mask=b_ok[:, None] & dv_ok[None, :],
            )

    @triton.jit
    def softmax_weights_kernel(
        qh_ptr,  # (B, D) query in the bank's dtype (the same rounding as pass 1)
        bank_ptr,  # (N, D) or (N, T, D), contiguous
        excl_ptr,  # (B, K) int64, -1 padded (only read when K > 0)
        tau_ptr,  # 0-dim float32
        m_ptr,  # (B,) float32: the max logit of pass 1
        p_out,  # (B, >= C*T) in the bank's dtype, row stride P_STRIDE: exp(l - m), on the winning token for MULTI
        B, N, D, T, row_start, C, P_STRIDE, NUM_QB,
        K: tl.constexpr, MULTI: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Pass 2 of "two_pass": the softmax weights of bank rows [row_start, row_start + C). One grid axis (2**31 - 1
        programs; axis 1 allows 65535) over (row tile, query block), query block fastest to share tiles in L2."""
        pid = tl.program_id(0)
        offs_b = (pid % NUM_QB) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        offs_b64 = offs_b.to(tl.int64)
        offs_c = (pid // NUM_QB) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of this chunk
        c_ok = offs_c < C
        offs_n = row_start + offs_c.to(tl.int64)
        n_ok = c_ok & (offs_n < N)
        s, best_t = _row_scores(qh_ptr, qh_ptr, bank_ptr, offs_n * T * D, n_ok, offs_b64, b_ok, D, T,
                                tl.arange(0, BLOCK_K), MULTI, False, IEEE, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K)
        keep = _keep_mask(excl_ptr, offs_b64, b_ok, offs_n, n_ok, K)
        inv_tau = 1.0 / tl.load(tau_ptr).to(tl.float32)
        m = tl.load(m_ptr + offs_b64, mask=b_ok, other=0.0)
        p = tl.where(keep, tl.exp(s * inv_tau - m[:, None]), 0.0)  # (BLOCK_B, BLOCK_N)
        out = p_out + offs_b64[:, None] * P_STRIDE + offs_c.to(tl.int64)[None, :] * T
        ok = b_ok[:, None] & c_ok[None, :]
        if MULTI:  # (C, T) slots per query: the weight on the winning token, zeros elsewhere
            for tok in range(0, T):
                tl.store(out + tok, tl.where(best_t == tok, p, 0.0).to(p_out.dtype.element_ty), mask=ok)
        else:
            tl.store(out, p.to(p_out.dtype.element_ty), mask=ok)
