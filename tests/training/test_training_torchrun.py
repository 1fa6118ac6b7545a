"""Stage 2 launched by torchrun (2 CPU ranks, gloo from the environment) equals one process to 1e-6."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_distributed import CONFIG, _train

REPO = Path(__file__).resolve().parents[2]

# The script torchrun runs on each rank: nothing distributed in it; the trainer reads RANK /
# WORLD_SIZE / LOCAL_RANK / MASTER_* and initialises the process group itself.
SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from safetensors.torch import save_file
from test_training_distributed import _train

weights, losses, layout = _train()  # the default: the bank sharded over the ranks
assert layout[0], layout
assert dist.is_initialized() and dist.get_world_size() == int(os.environ["WORLD_SIZE"])
assert dist.get_backend() == "gloo"
if dist.get_rank() == 0:
    out = sys.argv[1]
    save_file(weights, os.path.join(out, "weights.safetensors"))
    with open(os.path.join(out, "run.json"), "w") as handle:
        json.dump({"losses": losses, "world": dist.get_world_size()}, handle)
dist.barrier()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two torchrun ranks that import torch: ~20-60 s on the shared 2-core box
def test_torchrun_two_ranks_match_single_process(tmp_path):
    script = tmp_path / "stage2_rank.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",  # CPU ranks: gloo
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    expected, expected_losses, _ = _train()
    got = load_file(str(tmp_path / "weights.safetensors"))
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["world"] == 2 and len(run["losses"]) == CONFIG["epochs"]
    assert set(got) == set(expected)
    initial = _initial_weights()
    trained = [n for n in expected if n == "log_tau" or not torch.equal(expected[n], initial[n])]
    assert "log_tau" in trained and len(trained) > 1  # the query side moved: the comparison is not vacuous
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-6, rtol=1e-6), (name, (got[name] - value).abs().max())
    assert run["losses"] == pytest.approx(expected_losses, rel=1e-6, abs=1e-6)


def _initial_weights():
    from _toy import make_model

    torch.manual_seed(0)
    return {n: p.detach().clone() for n, p in make_model().named_parameters()}


def test_init_distributed_without_a_job_stays_single_process(monkeypatch):
    import torch.distributed as dist

    from cir_plugins.training.loop import distributed_rank, init_distributed

    for world in (None, "1"):
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        if world is not None:
            monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert init_distributed() == torch.device("cpu")
        assert not dist.is_initialized() and distributed_rank() == (0, 1)
