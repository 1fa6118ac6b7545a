"""The sharded bank loss, ``bank_contrastive_loss(..., shard=BankShard(...))``, equals the single-process
reference (gloo, 2 CPU ranks).

One ``torch.multiprocessing.spawn`` of two ranks runs every scenario (process start-up dominates)
and writes its measurements to JSON; the tests below check them.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cir_plugins._utils import shard_rows
from cir_plugins.errors import ConfigError
from cir_plugins.negatives.distributed import BankShard
from cir_plugins.negatives.loss import bank_contrastive_loss

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def _loss_case(rank, world, *, similarity, qdtype, bdtype, n, d, t, bsizes, k, seed, of_rank=False):
    """Sharded vs single-process loss of this rank's queries; returns relative errors. ``of_rank``: the shard
    from BankShard.of_rank instead of an explicit BankShard(start, n)."""
    from cir_plugins.negatives.loss import naive_bank_contrastive_loss

    g = torch.Generator().manual_seed(seed)  # same bank on every rank
    shape = (n, d) if similarity == "dot" else (n, t, d)
    bank = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(bdtype)
    # each rank has its own queries (different batch sizes), drawn from a per-rank stream
    gq = torch.Generator().manual_seed(seed * 100 + rank)
    b = bsizes[rank]
    q0 = torch.nn.functional.normalize(torch.randn(b, d, generator=gq, dtype=torch.float64), dim=-1).to(qdtype)
    target = torch.randint(0, n, (b,), generator=gq)
    excl = None
    k = k[rank] if isinstance(k, tuple) else k  # a tuple: each rank its own K (0: no exclude_rows)
    if k:
        excl = torch.randint(0, n, (b, k), generator=gq)
        excl[excl == target[:, None]] = -1
        excl[0, 0] = -1
    start, stop = shard_rows(n, rank, world)

    q = q0.clone().requires_grad_()
    tau = torch.tensor(0.07, dtype=torch.float64 if qdtype == torch.float64 else torch.float32, requires_grad=True)
    shard = BankShard.of_rank(n) if of_rank else BankShard(start, n)
    val = bank_contrastive_loss(q, bank[start:stop], target, tau, exclude_rows=excl, similarity=similarity,
                                shard=shard, chunk_size=4)
    val.backward()

    qr = q0.double().requires_grad_()
    taur = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    ref = naive_bank_contrastive_loss(qr, bank, target, taur, exclude_rows=excl, similarity=similarity)
    ref.backward()
    return {
        "loss": float(val),
        "ref": float(ref),
        "loss_rel": abs(float(val) - float(ref)) / max(abs(float(ref)), 1e-300),
        "dq_rel": _rel(q.grad, qr.grad),
        "dtau_rel": _rel(tau.grad, taur.grad),
        "dq_dtype": str(q.grad.dtype),
        "shard": [shard.row_offset, shard.n_total, start],
    }


def _layout_error_case(rank, world):
    """Shards that overlap must be refused on every rank with a ConfigError."""
    bank = torch.randn(10, 4)
    try:
        bank_contrastive_loss(torch.randn(2, 4), bank[:6], torch.tensor([0, 1]), 0.1, shard=BankShard(0, 10))
    except ConfigError as exc:
        return str(exc)
    return None


def _refused_case(rank, world):
    """A NaN query on rank 0 only: rank 0 names it, rank 1 names rank 0; neither waits for the other."""
    query = torch.randn(2, 4)
    if rank == 0:
        query[1, 2] = float("nan")
    start, stop = shard_rows(10, rank, world)
    try:
        bank_contrastive_loss(query, torch.randn(10, 4)[start:stop], torch.tensor([0, 9]), 0.1,
                              shard=BankShard(start, 10))
    except Exception as exc:  # noqa: BLE001 - the test reads the type and message
        return [type(exc).__name__, str(exc)]
    return None


def _triton_cases(rank, world):
    """backend="triton" with a one-row bank under the interpreter (the worker starts with TRITON_INTERPRET=1, read
    when triton is first imported): rank 1's empty shard has nothing for the kernel and still takes part. Then,
    the interpreter off, "triton" on rank 0 only, on CPU tensors: rank 0 names the backend, rank 1 names rank 0,
    neither waits for the other."""
    bank = torch.nn.functional.normalize(torch.randn(1, 4, generator=torch.Generator().manual_seed(5)), dim=-1)
    query = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    start, stop = shard_rows(1, rank, world)
    loss = bank_contrastive_loss(query, bank[start:stop], torch.zeros(3, dtype=torch.int64), 0.1,
                                 shard=BankShard(start, 1), backend="triton")
    os.environ.pop("TRITON_INTERPRET")
    start, stop = shard_rows(10, rank, world)
    try:
        bank_contrastive_loss(torch.randn(2, 4), torch.randn(10, 4)[start:stop], torch.tensor([0, 9]), 0.1,
                              shard=BankShard(start, 10), backend="triton" if rank == 0 else "torch")
        refused = None
    except ConfigError as exc:
        refused = str(exc)
    return {"refused": refused, "empty_shard_loss": float(loss)}


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["TRITON_INTERPRET"] = "1"  # for _triton_cases; the other cases' CPU tensors take the torch backend
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {
            "dot_f64": _loss_case(rank, world, similarity="dot", qdtype=torch.float64, bdtype=torch.float64,
                                  n=23, d=6, t=1, bsizes=(3, 4), k=3, seed=1),
            "max_token_f64": _loss_case(rank, world, similarity="max_token", qdtype=torch.float64,
                                        bdtype=torch.float64, n=17, d=5, t=3, bsizes=(4, 2), k=2, seed=2,
                                        of_rank=True),
            "dot_f32_bf16_bank": _loss_case(rank, world, similarity="dot", qdtype=torch.float32,
                                            bdtype=torch.bfloat16, n=29, d=8, t=1, bsizes=(5, 5), k=0, seed=3),
            # rank 0 passes no exclude_rows, rank 1 three columns: the shards pad to the largest K
            "dot_f64_ragged_k": _loss_case(rank, world, similarity="dot", qdtype=torch.float64, bdtype=torch.float64,
                                           n=19, d=5, t=1, bsizes=(3, 4), k=(0, 3), seed=7),
            # a one-row bank: rank 1 holds an empty shard and still takes part
            "dot_f64_empty_shard": _loss_case(rank, world, similarity="dot", qdtype=torch.float64,
                                              bdtype=torch.float64, n=1, d=4, t=1, bsizes=(2, 3), k=0, seed=6),
            "layout_error": _layout_error_case(rank, world),
            "refused": _refused_case(rank, world),
            "triton": _triton_cases(rank, world),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(res, fh)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case,tol", [("dot_f64", 1e-12), ("max_token_f64", 1e-12), ("dot_f32_bf16_bank", 1e-5),
                                      ("dot_f64_ragged_k", 1e-12), ("dot_f64_empty_shard", 1e-12)])
def test_sharded_loss_equals_single_process(results, case, tol):
    for rank in range(WORLD):
        r = results[rank][case]
        assert (abs(r["loss"] - r["ref"]) if r["ref"] == 0.0 else r["loss_rel"]) <= tol, (rank, r)
        assert r["dq_rel"] <= tol, (rank, r)
        assert r["dtau_rel"] <= tol, (rank, r)
    if case == "dot_f64_empty_shard":  # one row, always the target: the loss is log(1) = 0 on both ranks
        assert [results[r][case]["ref"] for r in range(WORLD)] == [0.0, 0.0]
        return
    # the two ranks had different queries, so different losses: the test is not trivially equal
    assert results[0][case]["ref"] != results[1][case]["ref"]


def test_sharded_loss_keeps_query_dtype(results):
    assert results[0]["dot_f32_bf16_bank"]["dq_dtype"] == "torch.float32"
    assert results[0]["dot_f64"]["dq_dtype"] == "torch.float64"


def test_bank_shard_of_rank_is_this_ranks_rows(results):
    # BankShard.of_rank(n) holds shard_rows(n, rank, world)[0] and n (the max_token case uses it)
    for rank in range(WORLD):
        offset, n_total, start = results[rank]["max_token_f64"]["shard"]
        assert (offset, n_total) == (start, 17)
    assert [results[r]["max_token_f64"]["shard"][0] for r in range(WORLD)] == [0, 9]


def test_overlapping_shards_are_refused_on_every_rank(results):
    for rank in range(WORLD):
        msg = results[rank]["layout_error"]
        assert msg is not None and "tile the rows" in msg and "shard_rows" in msg


def test_bad_input_on_one_rank_is_an_error_on_every_rank(results):
    assert results[0]["refused"][0] == "NonFiniteError" and "query rows [1]" in results[0]["refused"][1]
    assert results[1]["refused"][0] == "ConfigError" and "rank(s) [0] refused" in results[1]["refused"][1]


def test_a_backend_one_rank_cannot_run_is_an_error_on_every_rank(results):
    assert "the triton backend cannot run" in results[0]["triton"]["refused"]
    assert "rank(s) [0] refused" in results[1]["triton"]["refused"]


def test_an_empty_shard_takes_part_in_the_triton_backend(results):
    # a one-row bank holds the target of every query: the loss is -log(1) = 0 on both ranks
    assert results[0]["triton"]["empty_shard_loss"] == pytest.approx(0.0, abs=1e-6)
    assert results[1]["triton"]["empty_shard_loss"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n,world", [(0, 3), (1, 2), (10, 3), (23, 2), (1000, 7)])
def test_shard_rows_tiles_the_bank(n, world):
    spans = [shard_rows(n, r, world) for r in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (_, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 == b0
    sizes = [b - a for a, b in spans]
    assert max(sizes) - min(sizes) <= 1


def test_shard_rows_bad_arguments():
    with pytest.raises(ConfigError, match="rank"):
        shard_rows(10, 2, 2)
    with pytest.raises(ConfigError, match="int"):
        shard_rows(10.0, 0, 2)


def test_sharded_loss_without_process_group_explains():
    assert not dist.is_initialized(), "a test leaked a process group into the main pytest process"
    with pytest.raises(ConfigError, match="init_process_group"):
        bank_contrastive_loss(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), 0.1, shard=BankShard(0, 5))
    with pytest.raises(ConfigError, match="init_process_group"):
        BankShard.of_rank(5)
