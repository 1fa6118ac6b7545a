"""precision="two_pass" of the Triton backend (issue 20): pass 1 = the fused kernel without the
query-gradient accumulator, pass 2 = softmax weights written chunk by chunk in the bank's dtype and
one GEMM per chunk. Checked through Triton's interpreter (TRITON_INTERPRET=1, in a subprocess, the
harness of tests/negatives/test_fused.py): the loss of ``bank_contrastive_loss(..., backend="triton",
precision="two_pass")`` against the float64 full-logits reference, and the statistics of
``fused.bank_partials`` against the single-pass "fast" precision (the same query rounding) at small
odd sizes with several bank chunks.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from test_fused import _SCRIPT, _interpret  # the same interpreter harness (cases -> loss and gradients vs float64)

from cir_plugins.errors import ConfigError
from cir_plugins.negatives.loss import bank_contrastive_loss

CASES = {
    "two_pass_bf16": dict(bank="bfloat16", query="float32", B=5, N=203, D=40, K=3, precision="two_pass"),
    "two_pass_fp32": dict(bank="float32", query="float32", B=19, N=203, D=70, K=4, precision="two_pass"),
    "two_pass_max_token_bf16": dict(bank="bfloat16", query="float32", B=5, N=37, D=24, K=2, precision="two_pass",
                                    T=3),
    "two_pass_all_but_target": dict(bank="bfloat16", query="float32", B=3, N=7, D=24, K=6, precision="two_pass",
                                    exclude_all_but_target=True),
}
# Against float64 over the exact query: a bf16 bank rounds the query once to bf16 (as "fast"), so the
# loss is within bf16 rounding of the logits (tau = 0.05 magnifies it) and the gradient also carries
# the bf16 rounding of each softmax weight. A float32 bank keeps float32 weights and IEEE products.
TOL = {"two_pass_bf16": (2e-2, 5e-2), "two_pass_fp32": (1e-5, 1e-5), "two_pass_max_token_bf16": (2e-2, 5e-2),
       "two_pass_all_but_target": (2e-2, 5e-2)}

# Pass 1 is the "fast" kernel without w: m, z, t equal "fast"'s. w comes from each weight exp(l - m) rounded
# once to bf16, so against float64 statistics of the same bf16-rounded query its error is that rounding
# (2**-9 per weight, less after summing). TWO_PASS_CHUNK_BYTES is shrunk so the bank spans several chunks.
_VS_FAST = textwrap.dedent(
    r"""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from cir_plugins.negatives import fused
    fused.TWO_PASS_CHUNK_BYTES = 7 * 64 * 2  # 64-row chunks at B=7 in bf16 (the kernel's 32-row tiles, 2 each)
    fused.TWO_PASS_GEMM_SLICE = 20  # each chunk's GEMM batched over slices of 20 columns, plus a tail
    g = torch.Generator().manual_seed(5)
    out = {}
    for name, shape, ex in (("dot", (203, 40), True), ("max_token", (45, 3, 40), False)):
        bank = F.normalize(torch.randn(*shape, generator=g), dim=-1).to(torch.bfloat16)
        q = F.normalize(torch.randn(7, 40, generator=g), dim=-1)
        excl = torch.randint(-1, shape[0], (7, 3), generator=g) if ex else None
        tau = torch.tensor(0.07)
        a = fused.bank_partials(q, bank, tau, excl, precision="two_pass")
        b = fused.bank_partials(q, bank, tau, excl, precision="fast")
        rel = lambda x, y: float((x.double() - y.double()).abs().max() / y.double().abs().max())
        # float64 reference of E_p[b] over the bf16-rounded query
        qb, bk = q.bfloat16().double(), bank.double()
        sims = qb @ bk.T if bank.dim() == 2 else torch.einsum("bd,ntd->bnt", qb, bk).amax(2)
        if excl is not None:
            for i in range(7):
                sims[i, excl[i][excl[i] >= 0]] = float("-inf")
        p = torch.softmax(sims / 0.07, dim=1)
        if bank.dim() == 2:
            ref_w = p @ bk
        else:
            win = torch.einsum("bd,ntd->bnt", qb, bk).argmax(2)  # (B, N) winning token
            ref_w = torch.einsum("bn,bnd->bd", p, bk[torch.arange(bk.shape[0])[None, :], win])
        out[name] = {"m": rel(a.m, b.m), "z": rel(a.z, b.z), "t": rel(a.t, b.t),
                     "w_vs_fast": rel(a.w / a.z[:, None], b.w / b.z[:, None]),
                     "w_vs_f64": rel(a.w / a.z[:, None], ref_w),
                     "fast_vs_f64": rel(b.w / b.z[:, None], ref_w)}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreted():
    return _interpret(_SCRIPT, json.dumps(CASES))


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_pass_matches_float64_reference(interpreted, name):
    r = interpreted[name]
    loss_tol, grad_tol = TOL[name]
    assert r["bank_unchanged"] and r["loss_dtype"] == "torch.float32"
    assert r["loss_rel"] <= loss_tol, r
    assert r["dq_rel"] <= grad_tol, r
    assert r["dtau_rel"] <= grad_tol, r
    assert r["dtau_shape"] == []


def test_two_pass_equals_single_pass_fast_statistics():
    r = _interpret(_VS_FAST)
    for name in ("dot", "max_token"):
        assert r[name]["m"] <= 1e-6 and r[name]["z"] <= 1e-5 and r[name]["t"] <= 1e-5, r
        # the bf16 rounding of the weights only (2**-9 each; a few dominant weights at tau=0.07, D=40), and
        # no worse than the single-pass "fast" precision, which rounds its weights the same way
        assert r[name]["w_vs_f64"] <= 4e-3, r
        assert r[name]["w_vs_f64"] <= 1.5 * r[name]["fast_vs_f64"], r


def test_unknown_precision_is_a_config_error():
    # the triton backend names the precisions it knows (checked before it asks whether the kernel can run)
    with pytest.raises(ConfigError, match="two_pass"):
        bank_contrastive_loss(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), torch.tensor(0.1),
                              backend="triton", precision="half")


def test_bank_contrastive_loss_takes_the_precision():
    g = torch.Generator().manual_seed(3)
    q, bank = torch.randn(4, 8, generator=g), torch.randn(31, 8, generator=g)
    rows = torch.tensor([0, 5, 9, 30])
    with pytest.raises(ConfigError, match="precision"):
        bank_contrastive_loss(q, bank, rows, 0.1, precision="half")
    # on the CPU (torch backend, always float32) every precision gives the same loss
    losses = [bank_contrastive_loss(q, bank, rows, 0.1, precision=p) for p in ("exact", "fast", "two_pass")]
    assert losses[0] == losses[1] == losses[2]


# Pass 2's GEMM cut along the chunk into TWO_PASS_GEMM_SLICE-column slices (split-K, one batched GEMM plus a
# tail) must give the sum of one plain GEMM (slice 0). 768-row chunks of a 997-row bf16 bank at B=7: a full
# chunk and a last one of 229 rows, a strided view of the weight buffer; 64, 100 and 333 columns cut both into
# several slices (333 only the full one), 5000 none.
SLICES = (0, 64, 100, 333, 5000)
_SLICED = textwrap.dedent(
    r"""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from cir_plugins.negatives import fused
    fused.TWO_PASS_CHUNK_BYTES = 7 * 768 * 2
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(997, 24, generator=g), dim=-1).to(torch.bfloat16)
    q = F.normalize(torch.randn(7, 24, generator=g), dim=-1)
    excl = torch.randint(-1, 997, (7, 3), generator=g)
    w = {}
    for cols in json.loads(sys.argv[1]):
        fused.TWO_PASS_GEMM_SLICE = cols
        w[cols] = fused.bank_partials(q, bank, torch.tensor(0.07), excl, precision="two_pass").w
    one = w[0].double()
    print("RESULT " + json.dumps({str(c): {"rel": float((x.double() - one).abs().max() / one.abs().max()),
                                            "dtype": str(x.dtype), "shape": list(x.shape)} for c, x in w.items()}))
    """
)


@pytest.fixture(scope="module")
def sliced():
    return _interpret(_SLICED, json.dumps(SLICES))


@pytest.mark.parametrize("slice_cols", SLICES)
def test_weighted_chunk_sum_slices_equal_one_gemm(sliced, slice_cols):
    r = sliced[str(slice_cols)]
    assert r["dtype"] == "torch.float32" and r["shape"] == [7, 24]
    assert r["rel"] <= 1e-6, r
