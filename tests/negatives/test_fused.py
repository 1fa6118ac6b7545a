"""The Triton backend of the bank loss equals the full-logits reference, in value and gradients.

The kernel is run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``). That variable
must be set before triton is imported and must not leak into other tests, so the interpreter
cases run in one subprocess (module-scoped fixture) that prints JSON; the tests here check it.
Sizes are odd and small (the interpreter runs numpy per program). The loss goes through the one
entry point, ``bank_contrastive_loss(..., backend="triton")``; the statistics are compared with
``fused.bank_partials`` against ``core.torch_bank_stats`` on the same validated inputs. Real-GPU
variants are marked ``gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

from cir_plugins.errors import ConfigError, ShapeError
from cir_plugins.negatives import core, fused, loss

REPO = Path(__file__).resolve().parents[2]

# Each case: bank dtype, query dtype, B, N, D, K exclusions per query, precision, which grads.
CASES = {
    "fp32_bank": dict(bank="float32", query="float32", B=5, N=203, D=40, K=3, precision="exact"),
    "bf16_bank": dict(bank="bfloat16", query="float32", B=5, N=203, D=40, K=3, precision="exact"),
    "fp16_bank": dict(bank="float16", query="float32", B=5, N=203, D=40, K=3, precision="exact"),
    "bf16_query_bf16_bank": dict(bank="bfloat16", query="bfloat16", B=5, N=203, D=40, K=3, precision="exact"),
    # two query blocks (BLOCK_B=16), two column chunks (BLOCK_DV=64), several bank splits
    "fp32_multi_block": dict(bank="float32", query="float32", B=19, N=203, D=70, K=4, precision="exact"),
    "bf16_fast": dict(bank="bfloat16", query="float32", B=5, N=203, D=40, K=3, precision="fast"),
    "fp32_no_exclusions_tau_only": dict(bank="float32", query="float32", B=5, N=203, D=40, K=0,
                                        precision="exact", query_grad=False),
    # a bank smaller than one tile with every row but the target excluded for query 0
    "fp32_all_but_target_excluded": dict(bank="float32", query="float32", B=3, N=7, D=24, K=6,
                                         precision="exact", exclude_all_but_target=True),
    # multi-vector banks (N, T, D), score = max over the T tokens
    "max_token_bf16": dict(bank="bfloat16", query="float32", B=5, N=37, D=24, K=2, precision="exact", T=3),
    "max_token_fp32_multi_block": dict(bank="float32", query="float32", B=17, N=45, D=70, K=2,
                                       precision="exact", T=4),
}

# Relative tolerance per case: 1e-5 for float32 banks; 1e-3 for half banks. A bf16 *query* gets
# its gradient back in bf16, whose own rounding is 2**-9, so that case's gradients get 4e-3.
# "fast" rounds the query and softmax weights to bf16 once: checked only for sanity.
TOL = {
    "fp32_bank": (1e-5, 1e-5),
    "bf16_bank": (1e-3, 1e-3),
    "fp16_bank": (1e-3, 1e-3),
    "bf16_query_bf16_bank": (1e-3, 4e-3),
    "fp32_multi_block": (1e-5, 1e-5),
    "bf16_fast": (2e-2, 5e-2),
    "fp32_no_exclusions_tau_only": (1e-5, 1e-5),
    "fp32_all_but_target_excluded": (1e-5, 1e-5),
    "max_token_bf16": (1e-3, 1e-3),
    "max_token_fp32_multi_block": (1e-5, 1e-5),
}

_SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    import torch.nn.functional as F
    from cir_plugins.negatives import core, fused
    from cir_plugins.negatives.loss import bank_contrastive_loss, naive_bank_contrastive_loss, validate_loss_inputs

    cases = json.loads(sys.argv[1])
    out = {}
    for name, c in cases.items():
        g = torch.Generator().manual_seed(1234)
        B, N, D, K = c["B"], c["N"], c["D"], c["K"]
        T = c.get("T", 1)
        similarity = "max_token" if T > 1 else "dot"
        shape = (N, T, D) if T > 1 else (N, D)
        bank = F.normalize(torch.randn(*shape, generator=g), dim=-1).to(getattr(torch, c["bank"]))
        q0 = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(getattr(torch, c["query"]))
        target = torch.randint(0, N, (B,), generator=g)
        if K:
            excl = torch.randint(0, N, (B, K), generator=g)
            excl[excl == target[:, None]] = -1       # never the target
            excl[0, K // 2:] = -1                     # padding
            if K > 1:
                excl[1, 1] = excl[1, 0]               # a duplicate
            if c.get("exclude_all_but_target"):
                others = [r for r in range(N) if r != int(target[0])][:K]
                excl[0] = torch.tensor(others + [-1] * (K - len(others)))
        else:
            excl = None
        want_q = c.get("query_grad", True)
        bank_before = bank.clone()

        q = q0.clone().requires_grad_(want_q)
        tau = torch.tensor(0.05, requires_grad=True)
        val = bank_contrastive_loss(q, bank, target, tau, exclude_rows=excl, similarity=similarity, backend="triton",
                                    precision=c["precision"])
        val.backward()
        gq = q.grad.double() if want_q else None

        # reference: full float64 logits over the same bank values
        qr = q0.double().requires_grad_(True)
        taur = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        ref = naive_bank_contrastive_loss(qr, bank, target, taur, exclude_rows=excl, similarity=similarity)
        ref.backward()

        def rel(a, b):
            return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

        out[name] = {
            "loss": float(val.detach()), "ref": float(ref.detach()),
            "loss_rel": abs(float(val.detach()) - float(ref.detach())) / max(abs(float(ref.detach())), 1e-30),
            "dq_rel": rel(gq, qr.grad) if want_q else None,
            "dq_dtype": str(q.grad.dtype) if want_q else None,
            "dtau_rel": rel(tau.grad.double(), taur.grad),
            "dtau_shape": list(tau.grad.shape),
            "bank_unchanged": bool(torch.equal(bank, bank_before)),
            "loss_dtype": str(val.dtype),
        }
    if "partials" in sys.argv[2:]:
        # the one statistics core: Triton backend vs torch backend, same bank, same validated inputs
        g = torch.Generator().manual_seed(7)
        bank = F.normalize(torch.randn(61, 24, generator=g), dim=-1).to(torch.bfloat16)
        q = F.normalize(torch.randn(6, 24, generator=g), dim=-1)
        ex = torch.tensor([[3, -1], [-1, -1], [0, 60], [5, 5], [-1, 7], [59, -1]])
        target = torch.arange(6)  # none of them excluded
        tau = validate_loss_inputs(q, bank, target, torch.tensor(0.05), ex, "dot")
        a = fused.bank_partials(q, bank, tau, ex)
        b = core.torch_bank_stats(q, bank, tau, ex, "dot", chunk_size=16)
        def norm(st):
            m, z, t, w = st.m, st.z, st.t, st.w
            return torch.cat([(m + torch.log(z))[:, None], (t / z)[:, None], w / z[:, None]], 1).double()
        out["partials"] = {"rel": float((norm(a) - norm(b)).abs().max() / norm(b).abs().max())}
        bank3 = F.normalize(torch.randn(29, 3, 24, generator=g), dim=-1).to(torch.bfloat16)
        tau3 = validate_loss_inputs(q, bank3, target, torch.tensor(0.05), ex.clamp_max(28), "max_token")
        a = fused.bank_partials(q, bank3, tau3, ex.clamp_max(28))
        b = core.torch_bank_stats(q, bank3, tau3, ex.clamp_max(28), "max_token", chunk_size=8)
        out["partials"]["rel_max_token"] = float((norm(a) - norm(b)).abs().max() / norm(b).abs().max())
        # tile overrides (the tuner's knob) change the schedule, not the statistics: 19 queries and D=24 give
        # 2 query blocks x 2 column chunks x 4 splits of 16-row tiles, against 2 x 1 x 2 built in. The layout is
        # read from the kernel's launches: grid = (query blocks * column chunks, splits).
        real_kernel, layouts = fused.bank_partials_kernel, []

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **meta):
                    layouts.append([grid[0] // meta["NUM_DV"], meta["NUM_DV"], grid[1]])
                    return real_kernel[grid](*args, **meta)
                return launch

        fused.bank_partials_kernel = Recorder()
        q19 = F.normalize(torch.randn(19, 24, generator=g), dim=-1)
        ex19 = torch.randint(-1, 61, (19, 2), generator=g)
        t19 = torch.tensor([min({0, 1, 2} - set(r)) for r in ex19.tolist()])  # a target no query excludes
        tau19 = validate_loss_inputs(q19, bank, t19, tau, ex19, "dot")
        small = {"BLOCK_B": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_DV": 16, "programs_per_sm": 16}
        st = [fused.bank_partials(q19, bank, tau19, ex19, tiles=t) for t in (None, small)]
        fused.bank_partials_kernel = real_kernel
        out["partials"]["tiles_layout"] = layouts[1]
        out["partials"]["builtin_layout"] = layouts[0]
        out["partials"]["rel_tiles"] = float((norm(st[1]) - norm(st[0])).abs().max() / norm(st[0]).abs().max())
    print("RESULT " + json.dumps(out))
    """
)


# The default run covers the sizes the issue names; the rest run with -m slow.
CORE = ("fp32_bank", "bf16_bank", "fp32_all_but_target_excluded", "max_token_bf16")
EXTRA = tuple(sorted(set(CASES) - set(CORE)))


def _run_interpreted(names, extra=()):
    """Run the named cases once through the Triton interpreter in a fresh process."""
    return _interpret(_SCRIPT, json.dumps({n: CASES[n] for n in names}), *extra)


def _interpret(script, *args):
    """Run ``python -c script args`` with TRITON_INTERPRET=1; returns the JSON of its ``RESULT`` line."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def interpreted():
    return _run_interpreted(CORE, extra=("partials",))


@pytest.fixture(scope="module")
def interpreted_extra():
    return _run_interpreted(EXTRA)


def test_interpreter_env_does_not_leak():
    # the subprocess sets it; this process must run the compiled (or no) triton path
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _check_case(r, name):
    loss_tol, grad_tol = TOL[name]
    assert r["loss_rel"] <= loss_tol, r
    if r["dq_rel"] is not None:
        assert r["dq_rel"] <= grad_tol, r
        assert r["dq_dtype"] == "torch." + CASES[name]["query"]
    assert r["dtau_rel"] <= grad_tol, r
    assert r["dtau_shape"] == []
    assert r["bank_unchanged"]
    assert r["loss_dtype"] == "torch.float32"


@pytest.mark.parametrize("name", CORE)
def test_fused_matches_reference(interpreted, name):
    _check_case(interpreted[name], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXTRA)
def test_fused_matches_reference_more_dtypes(interpreted_extra, name):
    _check_case(interpreted_extra[name], name)


def test_fused_partials_match_torch_partials_for_sharded_loss(interpreted):
    # fused.bank_partials is the statistics of backend="triton" (single and sharded loss); on the same
    # validated inputs it must equal core.torch_bank_stats, the torch backend
    assert interpreted["partials"]["rel"] <= 1e-5
    assert interpreted["partials"]["rel_max_token"] <= 1e-5


def test_tile_overrides_keep_the_statistics(interpreted):
    # several query blocks, column chunks and bank splits: the same numbers as the built-in tiles
    assert interpreted["partials"]["tiles_layout"] == [2, 2, 4]
    assert interpreted["partials"]["builtin_layout"] == [2, 1, 2]  # the override did change the schedule
    assert interpreted["partials"]["rel_tiles"] <= 1e-5


class RecordingKernel:
    """Stands for ``fused.bank_partials_kernel``: records each launch (grid, tiles per split, meta-parameters)
    and writes neutral statistics (m = 0, z = 1, t = 0, w = 0); raises OUT_OF_RESOURCES for the query tile
    ``fail_block_b``."""

    def __init__(self, fail_block_b=None):
        self.launches = []
        self.fail_block_b = fail_block_b

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append(dict(grid=grid, tiles_per_split=args[13], **meta))
            if meta["BLOCK_B"] == self.fail_block_b:
                raise fused.OUT_OF_RESOURCES(262144, 232448, "shared memory")
            m, z, t, w = args[5:9]
            m.zero_(), z.fill_(1.0), t.zero_(), w.zero_()
        return launch


def test_tile_overrides_are_checked_and_applied():
    kernel = RecordingKernel()
    q, bank, tau = torch.randn(300, 768), torch.zeros(10_000, 768, dtype=torch.bfloat16), torch.tensor(0.05)
    with mock.patch.object(fused, "bank_partials_kernel", kernel, create=True):
        stats = fused.bank_partials(q, bank, tau, tiles={"BLOCK_N": 16, "num_stages": 2, "BLOCK_DV": 128})
        assert stats.m.shape == (300,) and stats.w.shape == (300, 768)
        (cfg,) = kernel.launches
        assert (cfg["BLOCK_N"], cfg["num_stages"], cfg["BLOCK_DV"], cfg["NUM_DV"]) == (16, 2, 128, 6)
        assert cfg["grid"][1] * cfg["tiles_per_split"] * cfg["BLOCK_N"] >= 10_000  # splits cover the bank
        with pytest.raises(ValueError, match="BLOCK_M"):
            fused.bank_partials(q[:4, :8], bank[:100, :8], tau, tiles={"BLOCK_M": 64})
        with pytest.raises(ValueError, match="BLOCK_M"):  # pass 2 of "two_pass" has its own tiles, checked alike
            fused.bank_partials(q[:4, :8], bank[:100, :8], tau, precision="two_pass", weight_tiles={"BLOCK_M": 64})
    assert len(kernel.launches) == 2  # the refused settings never reached the kernel (pass 1 of two_pass did)


# ---------------------------------------------------------------- availability and dispatch


def test_fused_available_false_on_cpu():
    q = torch.randn(3, 8)
    b = torch.randn(10, 8)
    assert fused.fused_available(q, b) is False
    assert fused.fused_available(q, torch.randn(10, 2, 8), "max_token") is False


def test_fused_available_false_when_disabled(monkeypatch):
    monkeypatch.setenv("CIR_PLUGINS_DISABLE_FUSED", "1")
    assert fused.fused_available(torch.randn(3, 8), torch.randn(10, 8)) is False


def test_select_backend_picks_triton_when_available(monkeypatch):
    fake_q = mock.Mock(is_cuda=True, shape=(4, 8))
    fake_b = mock.Mock(is_cuda=True, shape=(100, 8))
    monkeypatch.setattr(fused, "fused_available", lambda q, b, similarity="dot": True)
    assert loss.select_backend(fake_q, fake_b, "dot") == "triton"
    monkeypatch.setattr(fused, "fused_available", lambda q, b, similarity="dot": False)
    assert loss.select_backend(fake_q, fake_b, "dot") == "torch"
    # multi-vector banks take the triton backend when the kernel accepts them; a forced chunk size never does
    seen = []
    monkeypatch.setattr(fused, "fused_available", lambda q, b, similarity="dot": seen.append(similarity) or True)
    assert loss.select_backend(fake_q, fake_b, "max_token") == "triton" and seen == ["max_token"]
    assert loss.select_backend(fake_q, fake_b, "dot", chunk_size=64) == "torch"


def test_bank_loss_calls_fused_with_validated_arguments(monkeypatch):
    calls = []

    def recorder(query, bank, temperature, exclude_rows, *, need_w, precision):
        calls.append((query, bank, temperature, exclude_rows, need_w, precision))
        return core.torch_bank_stats(query, bank, temperature, exclude_rows, "dot", need_w=need_w)

    monkeypatch.setattr(loss, "select_backend", lambda *a, **k: "triton")
    monkeypatch.setattr(fused, "bank_partials", recorder)
    q = torch.randn(3, 8, requires_grad=True)
    bank = torch.randn(11, 8)
    target = torch.tensor([0, 5, 10])
    excl = torch.tensor([[1, -1], [2, 3], [-1, -1]])
    out = loss.bank_contrastive_loss(q, bank, target, 0.1, exclude_rows=excl)
    assert len(calls) == 1
    _, _, tau, ex, need_w, precision = calls[0]
    assert torch.equal(ex, excl) and need_w and precision == "exact"
    assert tau.dim() == 0 and tau.dtype == torch.float32 and abs(float(tau) - 0.1) < 1e-7
    ref = loss.naive_bank_contrastive_loss(q, bank, target, 0.1, exclude_rows=excl)
    assert torch.allclose(out, ref)


def test_bad_inputs_raise_clear_errors():
    # backend="triton" validates like every backend, before it asks whether the kernel can run
    def triton_loss(query, bank, target, tau, **kw):
        return loss.bank_contrastive_loss(query, bank, target, tau, backend="triton", **kw)

    with pytest.raises(ShapeError, match="same D"):
        triton_loss(torch.randn(2, 4), torch.randn(5, 3), torch.tensor([0, 1]), torch.tensor(0.1))
    with pytest.raises(ConfigError, match="precision"):
        triton_loss(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), torch.tensor(0.1), precision="turbo")
    with pytest.raises(ShapeError, match="target_rows"):
        triton_loss(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0]), torch.tensor(0.1))
    with pytest.raises(ConfigError, match="excludes its own target"):
        triton_loss(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), torch.tensor(0.1),
                    exclude_rows=torch.tensor([[3], [1]]))
    # a 1-element temperature is refused as on every backend (the removed wrappers accepted it)
    with pytest.raises(ShapeError, match="0-dim"):
        triton_loss(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), torch.tensor([0.1]))
    with pytest.raises(ConfigError, match="chunk_size is a setting of the torch backend"):
        triton_loss(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), torch.tensor(0.1), chunk_size=64)
    # valid inputs the kernel cannot take (CPU tensors here) are an error that says so, not a silent fallback
    with pytest.raises(ConfigError, match="the triton backend cannot run on these tensors") as info:
        triton_loss(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), torch.tensor(0.1))
    assert "Fix:" in str(info.value) and "did not import" not in str(info.value)


def test_the_refusal_names_why_triton_did_not_import(monkeypatch):
    monkeypatch.setattr(fused, "TRITON_ERROR", "ImportError: libcuda.so.1 not found")
    monkeypatch.setattr(fused, "fused_available", lambda *args: False)  # as where triton failed to import
    with pytest.raises(ConfigError, match="triton did not import: ImportError: libcuda.so.1 not found"):
        loss.bank_contrastive_loss(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), 0.1, backend="triton")


# ---------------------------------------------------------------- benchmark smoke run


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bank_loss_gpu.py"), "--smoke", "--device", "cpu",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    methods = {(r["kind"], r["method"]) for r in data["rows"]}
    assert {("single", "naive_fp32"), ("single", "naive_bf16"), ("single", "chunked"), ("single", "fused"),
            ("multi", "chunked"), ("multi", "fused")} <= methods
    for r in data["rows"]:
        if r["method"].startswith(("fused", "cce")):
            assert r["note"].startswith("skipped")  # no CUDA here
        else:
            assert r["ms"] > 0 and r["floor_ms"] > 0
            # every path computes the same loss as the library's chunked path (bf16 logits: loosely)
            assert r["rel_vs_chunked"] <= (2e-2 if r["method"] == "naive_bf16" else 1e-5), r
    assert "naive_fp32" in proc.stdout and "floor" in proc.stdout


# ---------------------------------------------------------------- real GPU


def _gpu_case(n, d, b, dtype, k=2, precision="exact", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=-1).to(dtype)
    q0 = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=g), dim=-1)
    target = torch.randint(0, n, (b,), device="cuda", generator=g)
    excl = torch.randint(0, n, (b, k), device="cuda", generator=g)
    excl[excl == target[:, None]] = -1
    return bank, q0, target, excl


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("b,n,d", [(5, 203, 40), (256, 100_003, 768), (33, 4097, 257)])
def test_fused_matches_reference_gpu(dtype, tol, b, n, d):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    bank, q0, target, excl = _gpu_case(n, d, b, dtype)
    q = q0.clone().requires_grad_()
    tau = torch.tensor(0.05, device="cuda", requires_grad=True)
    val = loss.bank_contrastive_loss(q, bank, target, tau, exclude_rows=excl, backend="triton")
    val.backward()
    qr = q0.double().requires_grad_()
    taur = torch.tensor(0.05, device="cuda", dtype=torch.float64, requires_grad=True)
    ref = loss.naive_bank_contrastive_loss(qr, bank, target, taur, exclude_rows=excl)
    ref.backward()
    assert abs(float(val) - float(ref)) <= tol * abs(float(ref))
    assert float((q.grad.double() - qr.grad).abs().max()) <= tol * float(qr.grad.abs().max())
    assert abs(float(tau.grad) - float(taur.grad)) <= tol * abs(float(taur.grad))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)])
def test_fused_max_token_matches_reference_gpu(dtype, tol):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    n, t, d, b = 20_011, 32, 256, 33
    bank = torch.nn.functional.normalize(torch.randn(n, t, d, device="cuda", generator=g), dim=-1).to(dtype)
    q0 = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=g), dim=-1)
    target = torch.randint(0, n, (b,), device="cuda", generator=g)
    q = q0.clone().requires_grad_()
    tau = torch.tensor(0.05, device="cuda", requires_grad=True)
    val = loss.bank_contrastive_loss(q, bank, target, tau, similarity="max_token", backend="triton")
    val.backward()
    qr = q0.double().requires_grad_()
    taur = torch.tensor(0.05, device="cuda", dtype=torch.float64, requires_grad=True)
    ref = loss.naive_bank_contrastive_loss(qr, bank, target, taur, similarity="max_token")
    ref.backward()
    assert abs(float(val) - float(ref)) <= tol * abs(float(ref))
    assert float((q.grad.double() - qr.grad).abs().max()) <= tol * float(qr.grad.abs().max())


@pytest.mark.gpu
def test_fused_handles_more_than_2_pow_31_elements_gpu():
    """N * D > 2**31: row offsets must be computed in int64."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    n, d, b = 9_000_000, 256, 8  # 2.3e9 elements, 4.6 GB in bf16
    free, _ = torch.cuda.mem_get_info()
    if free < 8e9:
        pytest.skip("needs 8 GB of free GPU memory")
    bank, q0, target, excl = _gpu_case(n, d, b, torch.bfloat16)
    target[-1] = n - 1  # a positive in the last rows, past 2**31 elements
    q = q0.clone().requires_grad_()
    tau = torch.tensor(0.05, device="cuda", requires_grad=True)
    val = loss.bank_contrastive_loss(q, bank, target, tau, exclude_rows=excl, backend="triton")
    val.backward()
    ref = loss.bank_contrastive_loss(q0, bank, target, 0.05, exclude_rows=excl, backend="torch", chunk_size=1 << 20)
    assert abs(float(val) - float(ref)) <= 1e-3 * abs(float(ref))
    assert torch.isfinite(q.grad).all()


# ---------------------------------------------------------------- the other GPU benchmarks run on CPU


def _run_script(args, tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_retrieval_benchmark_smoke_runs_on_cpu(tmp_path):
    data = _run_script([str(REPO / "benchmarks" / "retrieval_gpu.py"), "--smoke", "--device", "cpu"], tmp_path)
    by = {r["method"]: r for r in data["rows"]}
    assert set(by) == {"topk_rows", "topk_rows_big_chunk", "topk_rows_fp32_upcast", "retrieval_metrics",
                       "bare_bf16_topk", "topk_rows_no_filter", "topk_rows_group64", "topk_rows_group512"}
    for method in ("topk_rows_no_filter", "topk_rows_group64", "topk_rows_group512"):  # the candidate filter is exact
        assert by[method]["same_rows_and_scores_as_default"] is True, method
    assert by["topk_rows_fp32_upcast"]["share_rows_equal_to_default"] == 1.0  # on CPU both score in float32
    assert all(r["ms"] > 0 for r in by.values())
    assert by["topk_rows_big_chunk"]["same_rows_as_default"] is True
    assert 0.0 <= by["retrieval_metrics"]["metrics"]["R@50"] <= 100.0


@pytest.mark.slow
def test_bank_build_benchmark_runs_on_cpu(tmp_path):
    data = _run_script([str(REPO / "benchmarks" / "bank_build.py"), "--preset", "tiny", "--device", "cpu",
                        "--images", "32", "--batch-size", "16", "--rounds", "1"], tmp_path)
    assert {r["method"] for r in data["rows"]} == {"build", "bare_host", "bare_device"}
    assert all(r["images_per_s"] > 0 for r in data["rows"])


@pytest.mark.parametrize("tiles", [{"BLOCK_B": 0}, {"BLOCK_B": 24}, {"BLOCK_N": 8}, {"BLOCK_K": True},
                                   {"BLOCK_DV": "64"}, {"BLOCK_B": None}, {"num_warps": 3}, {"num_warps": 64},
                                   {"num_stages": 0}, {"programs_per_sm": -1}, {"programs_per_sm": 2.0}])
def test_bad_tile_values_are_refused_by_name(tiles):
    key = next(iter(tiles))
    kernel = RecordingKernel()
    with mock.patch.object(fused, "bank_partials_kernel", kernel, create=True), pytest.raises(ValueError, match=key):
        fused.bank_partials(torch.randn(4, 8), torch.randn(100, 8), torch.tensor(0.1), tiles=tiles)
    assert kernel.launches == []


def test_explicit_tiles_that_run_out_of_resources_are_not_changed():
    """Tiles the caller chose are the caller's: OUT_OF_RESOURCES propagates, no silent retry with other tiles."""
    kernel = RecordingKernel(fail_block_b=128)
    q, bank, tau = torch.randn(70, 8), torch.randn(50, 8), torch.tensor(0.05)
    with mock.patch.object(fused, "bank_partials_kernel", kernel, create=True), pytest.raises(fused.OUT_OF_RESOURCES):
        fused.bank_partials(q, bank, tau, tiles={"BLOCK_B": 128})
    assert [(c["BLOCK_B"], c["num_warps"]) for c in kernel.launches] == [(128, 4)]


def test_out_of_resources_falls_back_to_64_query_tiles_on_cpu(monkeypatch, caplog):
    """The retry after OUT_OF_RESOURCES, on the CPU: the built-in choice stands in for the CUDA one (128 queries, 8
    warps), the kernel for a GPU with less shared memory than the tuning one."""
    real = fused.tile_config

    def cuda_like(b, n, d, device, tiles=None, need_w=True):
        if tiles is None:  # the built-in choice: CUDA's for more than 64 queries
            return {**real(b, n, d, device, {"BLOCK_B": 128}, need_w), "num_warps": 8}
        return real(b, n, d, device, tiles, need_w)

    monkeypatch.setattr(fused, "tile_config", cuda_like)
    kernel = RecordingKernel(fail_block_b=128)
    q, bank, tau = torch.randn(70, 8), torch.randn(50, 8), torch.tensor(0.05)
    with mock.patch.object(fused, "bank_partials_kernel", kernel, create=True):
        stats = fused.bank_partials(q, bank, tau)
    assert [(c["BLOCK_B"], c["num_warps"]) for c in kernel.launches] == [(128, 8), (64, 4)]
    assert stats.m.shape == (70,) and stats.w.shape == (70, 8)
    assert "falling back to 64-query tiles" in caplog.text


# The built-in CUDA tile choice is made only for CUDA tensors (on the CPU and under the interpreter the small
# interpreter tiles are used), so these two run where a GPU is; the kernel is replaced by RecordingKernel.


def _check_cuda_tile_choice(config):
    """The built-in CUDA tiles for D = 768: ``config(b, tiles=None)`` -> the tile settings of a launch for b queries."""
    pick = {b: config(b) for b in (8, 32, 64, 256)}
    forced = config(32, {"BLOCK_B": 128})
    forced_warps = config(256, {"num_warps": 2})
    assert [(pick[b]["BLOCK_B"], pick[b]["num_warps"]) for b in (8, 32, 64, 256)] == \
        [(16, 4), (32, 4), (64, 4), (128, 8)]
    assert (forced["BLOCK_B"], forced["num_warps"]) == (128, 8)  # warps follow the overridden tile
    assert (forced_warps["BLOCK_B"], forced_warps["num_warps"]) == (128, 2)
    assert pick[256]["NUM_DV"] == 3 and pick[256]["num_qb"] == 2


def test_cuda_tile_choice_and_warps_follow_the_query_tile_on_cpu(monkeypatch):
    """The CUDA branch of the tile choice, from a stand-in for the device's properties (132 SMs, an H100)."""
    from types import SimpleNamespace

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    _check_cuda_tile_choice(lambda b, tiles=None: fused.tile_config(b, 1_000_000, 768, cuda, tiles))


@pytest.mark.gpu
def test_cuda_tile_choice_and_warps_follow_the_query_tile(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bank, tau = torch.zeros(4096, 768, device="cuda", dtype=torch.bfloat16), torch.tensor(0.05, device="cuda")

    def launch(b, tiles=None):
        kernel = RecordingKernel()
        with mock.patch.object(fused, "bank_partials_kernel", kernel):
            fused.bank_partials(torch.randn(b, 768, device="cuda"), bank, tau, tiles=tiles)
        (cfg,) = kernel.launches
        return dict(cfg, num_qb=cfg["grid"][0] // cfg["NUM_DV"])

    _check_cuda_tile_choice(launch)


@pytest.mark.gpu
def test_out_of_resources_falls_back_to_64_query_tiles(monkeypatch):
    """A GPU with less shared memory than the tuning one: the built-in 128-query launch is retried with 64."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = RecordingKernel(fail_block_b=128)
    q, bank = torch.randn(70, 8, device="cuda"), torch.randn(50, 8, device="cuda")
    tau = torch.tensor(0.05, device="cuda")
    with mock.patch.object(fused, "bank_partials_kernel", kernel):
        stats = fused.bank_partials(q, bank, tau)
        assert [(c["BLOCK_B"], c["num_warps"]) for c in kernel.launches] == [(128, 8), (64, 4)]
        assert stats.m.shape == (70,) and stats.w.shape == (70, 8)
        kernel.launches.clear()
        with pytest.raises(fused.OUT_OF_RESOURCES):  # explicit tiles are the caller's: no silent change
            fused.bank_partials(q, bank, tau, tiles={"BLOCK_B": 128})
        assert [(c["BLOCK_B"], c["num_warps"]) for c in kernel.launches] == [(128, 8)]


def test_tile_sweep_smoke_runs_on_cpu(tmp_path):
    """benchmarks/fused_tune.py through the interpreter: every setting runs and matches the float32 reference."""
    out = tmp_path / "tune.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fused_tune.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 6 and set(data["best"]) == {"exact", "fast"}
    for r in data["rows"]:
        assert "ms" in r, r  # no setting failed or was skipped
        assert r["lse_rel"] <= (1e-5 if r["precision"] == "exact" else 1e-3), r
        assert r["eb_rel"] <= (1e-4 if r["precision"] == "exact" else 1e-2), r
    assert "built-in" in proc.stdout and "x_floor" in proc.stdout
