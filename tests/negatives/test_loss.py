"""bank_contrastive_loss against a float64 full-logits cross-entropy, on every path."""

import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import cir_plugins as cp
import cir_plugins.negatives as negatives_pkg
from cir_plugins.errors import ConfigError, DeviceError, DTypeError, NonFiniteError, ShapeError
from cir_plugins.negatives import core, fused
from cir_plugins.negatives import loss as L

B, N, D, T = 7, 1037, 19, 5


def reference_loss(query, bank, target_rows, tau, exclude_rows, similarity):
    """Plain float64 cross-entropy over the full masked logits (written independently of the library)."""
    q = query.double()
    b = bank.detach().double()  # bf16 values upcast exactly
    if similarity == "dot":
        sims = torch.einsum("bd,nd->bn", q, b)
    else:
        sims = torch.einsum("bd,ntd->bnt", q, b).amax(dim=2)
    logits = sims / tau
    if exclude_rows is not None:
        mask = torch.zeros(logits.shape, dtype=torch.bool)
        for i, rows in enumerate(exclude_rows.tolist()):
            mask[i, [r for r in rows if r >= 0]] = True
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, target_rows)


def make_inputs(similarity, bank_dtype=torch.float32, n=N, with_exclusions=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, D, generator=g, dtype=torch.float64)
    shape = (n, D) if similarity == "dot" else (n, T, D)
    bank = F.normalize(torch.randn(*shape, generator=g), dim=-1).to(bank_dtype)
    target = torch.randint(0, n, (B,), generator=g)
    exclude = None
    if with_exclusions:
        exclude = torch.randint(0, n, (B, 6), generator=g)
        exclude[exclude == target[:, None]] = -1
        exclude[1] = -1  # one query excludes nothing
        exclude[2, 3:] = -1
        exclude[3, 0] = (target[3] + 1) % n  # a neighbour of the target, often in the same chunk
    return query, bank, target, exclude


def loss_and_grads(fn, query, bank, target, tau_value, exclude, similarity, **kw):
    q = query.clone().requires_grad_(True)
    tau = torch.tensor(tau_value, dtype=torch.float64, requires_grad=True)
    value = fn(q, bank, target, tau, exclude_rows=exclude, similarity=similarity, **kw) if fn is not reference_loss \
        else fn(q, bank, target, tau, exclude, similarity)
    gq, gt = torch.autograd.grad(value, [q, tau])
    return value.detach(), gq, gt


def assert_rel_close(a, b, rtol=1e-6):
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) <= rtol, (a, b)


@pytest.mark.parametrize("similarity", ["dot", "max_token"])
@pytest.mark.parametrize("with_exclusions", [False, True])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 64, 331])
def test_matches_float64_reference(similarity, with_exclusions, bank_dtype, chunk_size):
    query, bank, target, exclude = make_inputs(similarity, bank_dtype, with_exclusions=with_exclusions)
    want = loss_and_grads(reference_loss, query, bank, target, 0.07, exclude, similarity)
    got = loss_and_grads(cp.bank_contrastive_loss, query, bank, target, 0.07, exclude, similarity,
                         chunk_size=chunk_size)
    for g, w in zip(got, want):
        assert_rel_close(g, w)
    assert got[0].dtype == torch.float64
    # the documented reference agrees too
    naive = loss_and_grads(L.naive_bank_contrastive_loss, query, bank, target, 0.07, exclude, similarity)
    for g, w in zip(naive, want):
        assert_rel_close(g, w)


@pytest.mark.parametrize("similarity", ["dot", "max_token"])
def test_automatic_chunk_size_follows_the_budget(similarity, monkeypatch):
    tokens = T if similarity == "max_token" else 1
    n = 2011
    query, bank, target, exclude = make_inputs(similarity, n=n, seed=3)
    assert L.select_backend(query, bank, similarity) == "torch"  # no CUDA: the torch backend
    assert L.select_backend(query, bank, similarity, chunk_size=50) == "torch"
    monkeypatch.setattr(core, "CHUNK_BUDGET_BYTES", 4 * B * tokens * (n // 5))  # about five chunks
    assert core.default_chunk_size(B, tokens) == n // 5
    sizes = []
    real = core.chunk_stats
    monkeypatch.setattr(core, "chunk_stats", lambda *a: sizes.append(a[2].shape[0]) or real(*a))  # a[2]: the chunk
    got = loss_and_grads(cp.bank_contrastive_loss, query, bank, target, 0.05, exclude, similarity)
    assert sizes[0] == n // 5 and sum(sizes) == n and len(sizes) == 6
    monkeypatch.undo()
    want = loss_and_grads(reference_loss, query, bank, target, 0.05, exclude, similarity)
    for g, w in zip(got, want):
        assert_rel_close(g, w)


def test_float32_query_accumulates_in_float32():
    query, bank, target, exclude = make_inputs("dot", torch.bfloat16)
    q32 = query.float().requires_grad_(True)
    value = cp.bank_contrastive_loss(q32, bank, target, 0.05, exclude_rows=exclude, chunk_size=128)
    value.backward()
    assert value.dtype == torch.float32 and q32.grad.dtype == torch.float32
    ref = reference_loss(q32.detach(), bank, target, 0.05, exclude, "dot")
    assert abs(float(value.detach()) - float(ref)) <= 1e-5 * abs(float(ref))


def test_bank_never_gets_a_gradient_and_float_temperature_works():
    query, bank, target, exclude = make_inputs("max_token")
    bank = bank.clone().requires_grad_(True)
    before = bank.detach().clone()
    q = query.clone().requires_grad_(True)
    for chunk in (None, 64):
        value = cp.bank_contrastive_loss(q, bank, target, 0.02, exclude_rows=exclude, similarity="max_token",
                                         chunk_size=chunk)
        value.backward()
    assert bank.grad is None and torch.equal(bank.detach(), before)
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_learnable_temperature_gradient_matches_finite_difference():
    query, bank, target, exclude = make_inputs("dot")
    log_tau = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    value = cp.bank_contrastive_loss(query, bank, target, log_tau.exp(), exclude_rows=exclude, chunk_size=200)
    (grad,) = torch.autograd.grad(value, [log_tau])
    h = 1e-6
    up = cp.bank_contrastive_loss(query, bank, target, float(torch.exp(torch.tensor(-3.0 + h, dtype=torch.float64))),
                                  exclude_rows=exclude, chunk_size=200)
    down = cp.bank_contrastive_loss(query, bank, target, float(torch.exp(torch.tensor(-3.0 - h, dtype=torch.float64))),
                                    exclude_rows=exclude, chunk_size=200)
    numeric = (up - down) / (2 * h)
    assert abs(float(grad) - float(numeric)) <= 1e-5 * abs(float(numeric))


def test_backward_scales_with_grad_output_and_no_grad_forward():
    query, bank, target, exclude = make_inputs("dot")
    q = query.clone().requires_grad_(True)
    (3.0 * cp.bank_contrastive_loss(q, bank, target, 0.1, exclude_rows=exclude, chunk_size=100)).backward()
    q_ref = query.clone().requires_grad_(True)
    reference_loss(q_ref, bank, target, 0.1, exclude, "dot").backward()
    assert_rel_close(q.grad, 3.0 * q_ref.grad)
    with torch.no_grad():
        plain = cp.bank_contrastive_loss(query, bank, target, 0.1, exclude_rows=exclude, chunk_size=100)
    assert_rel_close(plain, reference_loss(query, bank, target, 0.1, exclude, "dot"))


def test_exclusion_changes_the_loss_as_removing_the_row():
    query, bank, target, _ = make_inputs("dot", with_exclusions=False)
    drop = (target[0] + 5) % N
    exclude = torch.full((B, 1), -1, dtype=torch.long)
    exclude[0, 0] = drop
    got = cp.bank_contrastive_loss(query[:1], bank, target[:1], 0.05, exclude_rows=exclude[:1], chunk_size=64)
    keep = torch.ones(N, dtype=torch.bool)
    keep[drop] = False
    new_target = target[:1] - (target[:1] > drop).long()
    want = cp.bank_contrastive_loss(query[:1], bank[keep], new_target, 0.05)
    assert_rel_close(got, want)


def test_non_finite_bank_row_is_an_error():
    query, bank, target, _ = make_inputs("dot", with_exclusions=False)
    bank = bank.clone()
    bank[5, 0] = float("nan")
    for chunk in (None, 100):
        with pytest.raises(NonFiniteError):
            cp.bank_contrastive_loss(query, bank, target, 0.05, chunk_size=chunk)


def _base():
    query, bank, target, exclude = make_inputs("dot")
    return dict(query=query.float(), bank=bank, target_rows=target, temperature=0.05), exclude


@pytest.mark.parametrize("change, error, words", [
    (lambda a: a.update(query=a["query"][0]), ShapeError, "2-D"),
    (lambda a: a.update(bank=a["bank"][:, None, :]), ShapeError, "2-D"),
    (lambda a: a.update(bank=a["bank"][:, :5]), ShapeError, "dims differ"),
    (lambda a: a.update(target_rows=a["target_rows"][:3]), ShapeError, "(B,)"),
    (lambda a: a.update(target_rows=a["target_rows"].int()), DTypeError, "int64"),
    (lambda a: a.update(target_rows=a["target_rows"] + N), ShapeError, "out of range"),
    (lambda a: a.update(target_rows=a["target_rows"] - N), ShapeError, "out of range"),
    (lambda a: a.update(query=a["query"].long()), DTypeError, "floating"),
    (lambda a: a.update(bank=a["bank"].to(torch.int8)), DTypeError, "bank dtype"),
    (lambda a: a.update(temperature=0.0), ConfigError, "positive"),
    (lambda a: a.update(temperature=-0.1), ConfigError, "positive"),
    (lambda a: a.update(temperature=float("nan")), ConfigError, "finite"),
    (lambda a: a.update(temperature=torch.tensor(float("inf"))), ConfigError, "finite"),
    (lambda a: a.update(temperature=torch.tensor([0.05])), ShapeError, "0-dim"),
    (lambda a: a.update(temperature="0.05"), DTypeError, "float"),
    (lambda a: a.update(temperature=torch.tensor(0.05, device="meta")), DeviceError, "device"),
    (lambda a: a.update(bank=torch.empty(0, D)), ShapeError, "non-empty"),
    (lambda a: a["query"].__setitem__((2, 3), float("nan")), NonFiniteError, "rows [2]"),
    (lambda a: a.update(similarity="cosine"), ConfigError, "similarity"),
    (lambda a: a.update(chunk_size=0), ConfigError, "chunk_size"),
])
def test_validation_errors(change, error, words):
    args, _ = _base()
    change(args)
    with pytest.raises(error) as info:
        cp.bank_contrastive_loss(**args)
    assert words in str(info.value)
    assert "Fix:" in str(info.value)


def test_exclusion_errors_name_the_query():
    args, exclude = _base()
    bad = exclude.clone()
    bad[4, 0] = args["target_rows"][4]
    with pytest.raises(ConfigError, match=r"own target row.*queries \[4\]"):
        cp.bank_contrastive_loss(**args, exclude_rows=bad)
    bad = exclude.clone()
    bad[2, 1] = N
    with pytest.raises(ShapeError, match="for query 2"):
        cp.bank_contrastive_loss(**args, exclude_rows=bad)
    bad[2, 1] = -2
    with pytest.raises(ShapeError, match="out of range"):
        cp.bank_contrastive_loss(**args, exclude_rows=bad)
    with pytest.raises(ShapeError, match=r"\(B, K\)"):
        cp.bank_contrastive_loss(**args, exclude_rows=exclude[:3])
    with pytest.raises(DTypeError, match="int64"):
        cp.bank_contrastive_loss(**args, exclude_rows=exclude.int())


def test_bank_on_other_device_is_an_error():
    args, _ = _base()
    args["bank"] = torch.empty(N, D, device="meta")
    with pytest.raises(DeviceError, match="one device"):
        cp.bank_contrastive_loss(**args)


def test_missing_fused_module_is_tolerated_but_other_import_errors_are_not(monkeypatch):
    cuda_q, cuda_b = mock.Mock(is_cuda=True, shape=(4, 8)), mock.Mock(is_cuda=True, shape=(100, 8))
    query, bank = torch.randn(4, 8), torch.randn(100, 8)
    rows = torch.tensor([0, 1, 2, 3])
    monkeypatch.delattr(negatives_pkg, "fused", raising=False)
    monkeypatch.setitem(sys.modules, "cir_plugins.negatives.fused", None)  # import -> ModuleNotFoundError
    assert L.select_backend(cuda_q, cuda_b) == "torch"  # CUDA tensors, but no Triton module: the torch backend
    with pytest.raises(ConfigError, match="the triton backend cannot run"):
        L.bank_contrastive_loss(query, bank, rows, 0.1, backend="triton")
    assert float(L.bank_contrastive_loss(query, bank, rows, 0.1)) > 0  # "auto" runs without the module
    monkeypatch.delitem(sys.modules, "cir_plugins.negatives.fused")

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "cir_plugins.negatives.fused":
                raise ModuleNotFoundError("No module named 'triton_dep'", name="triton_dep")
            return None

    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(ModuleNotFoundError, match="triton_dep"):
        L.select_backend(cuda_q, cuda_b)
    with pytest.raises(ModuleNotFoundError, match="triton_dep"):
        L.bank_contrastive_loss(query, bank, rows, 0.1, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("similarity", ["dot", "max_token"])
def test_cuda_paths_match_reference(similarity):
    query, bank, target, exclude = make_inputs(similarity, torch.bfloat16, n=200_003 if similarity == "dot" else 40_009)
    dev = torch.device("cuda")
    q = query.float().to(dev).requires_grad_(True)
    tau = torch.tensor(0.05, device=dev, requires_grad=True)
    value = cp.bank_contrastive_loss(q, bank.to(dev), target.to(dev), tau, exclude_rows=exclude.to(dev),
                                     similarity=similarity)
    value.backward()
    q_ref = query.clone().requires_grad_(True)
    tau_ref = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    ref = reference_loss(q_ref, bank, target, tau_ref, exclude, similarity)
    ref.backward()
    assert abs(float(value) - float(ref)) <= 1e-4 * abs(float(ref))
    assert_rel_close(q.grad.double().cpu(), q_ref.grad, rtol=1e-3)
    assert_rel_close(tau.grad.double().cpu(), tau_ref.grad, rtol=1e-3)


@pytest.mark.parametrize("similarity", ["dot", "max_token"])
def test_one_row_chunks_on_a_small_bank(similarity):
    query, bank, target, exclude = make_inputs(similarity, n=23, seed=5)
    want = loss_and_grads(reference_loss, query, bank, target, 0.3, exclude, similarity)
    got = loss_and_grads(cp.bank_contrastive_loss, query, bank, target, 0.3, exclude, similarity, chunk_size=1)
    for g, w in zip(got, want):
        assert_rel_close(g, w)


def test_fused_path_gets_validated_arguments(monkeypatch):
    """The dispatcher hands the Triton backend a float32 0-dim temperature, a detached query and bank."""
    query, bank, target, exclude = make_inputs("dot")
    q = query.float().requires_grad_(True)
    bank = bank.clone().requires_grad_(True)
    seen = {}

    def bank_partials(query, bank, temperature, exclude_rows, *, need_w, precision):
        seen.update(query=query, bank=bank, temperature=temperature, exclude=exclude_rows, need_w=need_w)
        return core.torch_bank_stats(query, bank, temperature, exclude_rows, "dot", need_w=need_w)

    monkeypatch.setattr(fused, "fused_available", lambda query, bank, similarity="dot": similarity == "dot")
    monkeypatch.setattr(fused, "bank_partials", bank_partials)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # pretend the query is on CUDA
    assert L.select_backend(q, bank, "dot") == "triton"
    assert L.select_backend(q, bank, "dot", chunk_size=64) == "torch"
    assert L.select_backend(q, bank[:, None], "max_token") != "triton"
    tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    value = cp.bank_contrastive_loss(q, bank, target, tau, exclude_rows=exclude)
    monkeypatch.undo()
    assert torch.equal(seen["query"], q.detach()) and not seen["query"].requires_grad
    assert seen["exclude"] is exclude and not seen["bank"].requires_grad and seen["need_w"]
    assert seen["temperature"].dtype == torch.float32 and seen["temperature"].dim() == 0
    value.backward()
    assert tau.grad is not None and bank.grad is None
    want = loss_and_grads(reference_loss, query, bank.detach(), target, 0.05, exclude, "dot")
    assert abs(float(value.detach()) - float(want[0])) <= 1e-5 * float(want[0])


@pytest.mark.parametrize("similarity", ["dot", "max_token"])
def test_bank_stats_are_the_softmax_expectations(similarity):
    """The one statistics core against plain float64 softmax expectations, and parts merged by combine."""
    query, bank, target, exclude = make_inputs(similarity, n=301, seed=7)
    tau = 0.1
    q, b = query.double(), bank.double()
    tokens = torch.einsum("bd,ntd->bnt", q, b) if similarity == "max_token" else None
    sims = tokens.amax(2) if tokens is not None else q @ b.T  # (B, N)
    logits = sims / tau
    for i, rows in enumerate(exclude.tolist()):
        logits[i, [r for r in rows if r >= 0]] = float("-inf")
    p = logits.softmax(dim=1)  # (B, N)
    vecs = b if tokens is None else b[torch.arange(b.shape[0])[None, :], tokens.argmax(2)]  # (N, D) or (B, N, D)
    exp_b = p @ vecs if tokens is None else torch.einsum("bn,bnd->bd", p, vecs)
    # the torch backend on inputs validated as the loss validates them (tau: a 0-dim float64 tensor here)
    tau_t = L.validate_loss_inputs(query, bank, target, tau, exclude, similarity)
    assert tau_t.dtype == torch.float64 and tau_t.dim() == 0
    for chunk in (None, 37):
        st = core.torch_bank_stats(query, bank, tau_t, exclude, similarity, chunk_size=chunk)
        assert_rel_close(st.m + st.z.log(), logits.logsumexp(1))
        assert_rel_close(st.t / st.z, (p * sims).sum(1))
        assert_rel_close(st.w / st.z[:, None], exp_b)
    # statistics of two halves merged by BankStats.combine equal those of the whole bank
    halves = [core.torch_bank_stats(query, bank[:150], tau_t, exclude.where(exclude < 150, -1), similarity),
              core.torch_bank_stats(query, bank[150:], tau_t, (exclude - 150).where(exclude >= 150, -1), similarity)]
    merged = core.BankStats.stack(halves).combine()
    whole = core.torch_bank_stats(query, bank, tau_t, exclude, similarity)
    for name in ("m", "z", "t", "w"):
        assert_rel_close(getattr(merged, name), getattr(whole, name), rtol=1e-12)
    with pytest.raises(ConfigError, match="backend"):
        cp.bank_contrastive_loss(query, bank, target, tau, exclude_rows=exclude, similarity=similarity, backend="cuda")
