"""Issue 20's GPU scripts start and write what RESULTS.md quotes (CPU, tiny sizes), and the GPU checks
gpu_all.sh runs first (marked gpu: the two_pass bank loss at a real shape against float64, the
candidate-filtered top-k on a bf16 gallery, the build's copy stream)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(args, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_stage2(data, models, precisions):
    assert data["tiny"] is True and data["bank_rows"] == 2048
    assert [r["model"] for r in data["results"]] == models
    for r in data["results"]:
        for precision in precisions:
            s = r[f"stage2_{precision}"]
            assert set(s["split_ms"]) == {"text side", "fusion", "bank loss", "optimiser"}
            assert all(v >= 0 for v in s["split_ms"].values()) and s["stage2_step_ms"] > 0
            assert 0 < s["bank_loss_share"] < 1
            assert math.isfinite(s["bank_loss_value"]) and s["bank_loss_value"] > 0
        assert r["stage1"]["step_ms"] > 0
        assert 0 < r["stage2_trained_params_M"] < r["stage1_trained_params_M"] <= r["params_M"]


def test_stage2_real_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "stage2.json"
    proc = _run([sys.executable, "benchmarks/stage2_real.py", "--tiny", "--device", "cpu", "--models", "clip4cir",
                 "--out", str(out)])
    _check_stage2(json.loads(out.read_text()), ["clip4cir"], ["exact", "two_pass"])
    assert "stage 2 two_pass" in proc.stdout and "stage 1" in proc.stdout


@pytest.mark.slow
def test_gpu_all_dry_run_starts_every_step(tmp_path):
    dest = tmp_path / "dry"
    proc = _run(["bash", "benchmarks/gpu_all.sh", str(dest)], timeout=900, env_extra={"DRY": "1"})
    assert "all steps passed" in proc.stdout
    for name in ("bank_loss_gpu", "stage2_real_gpu", "retrieval_gpu", "bank_build_gpu", "fused_tune_two_pass_gpu"):
        assert json.loads((dest / f"{name}.json").read_text())["date"]
    _check_stage2(json.loads((dest / "stage2_real_gpu.json").read_text()), ["clip4cir", "sprc"],
                  ["exact", "two_pass"])
    rows = json.loads((dest / "retrieval_gpu.json").read_text())["rows"]
    assert next(r for r in rows if r["method"] == "topk_rows_no_filter")["same_rows_and_scores_as_default"]


# ---------------------------------------------------------------- real GPU


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("similarity", ["dot", "max_token"])
def test_two_pass_matches_float64_at_a_real_shape_gpu(similarity):
    _cuda()
    from cir_plugins.negatives import loss as L

    g = torch.Generator(device="cuda").manual_seed(0)
    b, n, d = (256, 100_003, 768) if similarity == "dot" else (32, 20_011, 256)
    shape = (n, d) if similarity == "dot" else (n, 32, d)
    bank = torch.nn.functional.normalize(torch.randn(*shape, device="cuda", generator=g), dim=-1).bfloat16()
    q0 = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=g), dim=-1)
    target = torch.randint(0, n, (b,), device="cuda", generator=g)
    excl = ((target + 1) % n)[:, None]
    grads = {}
    for precision in ("two_pass", "exact"):
        q = q0.clone().requires_grad_()
        tau = torch.tensor(0.05, device="cuda", requires_grad=True)
        val = L.bank_contrastive_loss(q, bank, target, tau, exclude_rows=excl, similarity=similarity,
                                      precision=precision)
        val.backward()
        grads[precision] = (float(val), q.grad.double(), float(tau.grad))
    qr = q0.double().requires_grad_()
    taur = torch.tensor(0.05, device="cuda", dtype=torch.float64, requires_grad=True)
    ref = L.bank_contrastive_loss(qr, bank, target, taur, exclude_rows=excl, similarity=similarity, chunk_size=4096)
    ref.backward()
    for precision, tol in (("exact", 1e-3), ("two_pass", 2e-2)):
        value, dq, dtau = grads[precision]
        assert abs(value - float(ref)) <= tol * abs(float(ref)), precision
        assert float((dq - qr.grad).abs().max()) <= tol * float(qr.grad.abs().max()), precision
        assert abs(dtau - float(taur.grad)) <= tol * abs(float(taur.grad)), precision


@pytest.mark.gpu
def test_filtered_topk_equals_unfiltered_on_a_bf16_gallery_gpu(monkeypatch):
    _cuda()
    from cir_plugins import metrics as M

    g = torch.Generator(device="cuda").manual_seed(1)
    gallery = torch.nn.functional.normalize(torch.randn(200_003, 64, device="cuda", generator=g), dim=-1).bfloat16()
    gallery[1000:1100] = gallery[5]  # exact duplicates: ties at every score of row 5
    query = torch.nn.functional.normalize(torch.randn(300, 64, device="cuda", generator=g), dim=-1)
    query[:10] = gallery[5].float()
    exclude = torch.randint(-1, 200_003, (300, 3), device="cuda", generator=g)
    got = M.topk_rows(query, gallery, 50, exclude_rows=exclude)
    monkeypatch.setattr(M, "TOPK_GROUP", 0)
    want = M.topk_rows(query, gallery, 50, exclude_rows=exclude)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.gpu
def test_build_copy_stream_gives_the_cpu_result_gpu():
    _cuda()
    from cir_plugins.negatives.bank import _prefetch_to

    batches = [(torch.arange(i * 4, i * 4 + 4), torch.randn(4, 3, 8, 8).pin_memory()) for i in range(7)]
    got = [(p, b.cpu()) for p, b in _prefetch_to(iter(batches), torch.device("cuda"))]
    assert len(got) == 7
    for (p0, b0), (p1, b1) in zip(batches, got):
        assert torch.equal(p0, p1) and torch.equal(b0, b1)
