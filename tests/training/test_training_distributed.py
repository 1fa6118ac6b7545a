"""Two CPU processes (gloo) train stage 2 to the same weights and losses as one process.

Both bank layouts: sharded (the default: each rank holds half of the bank rows and the loss
combines the softmax statistics of both shards) and replicated (``shard_bank=False``: a full copy
per rank). Gradients are averaged by DistributedDataParallel around the query side.
"""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from _gloo import spawn_gloo
from _toy import make_model, make_world
from safetensors.torch import load_file, save_file

from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training import Stage2Config, Stage2Trainer

# batch 15 over 2 ranks: uneven slices (7 + 8), and a last micro-batch of 65 % 15 = 5 (2 + 3)
CONFIG = dict(epochs=2, batch_size=15, lr=1e-2, show_progress=False,
              learn_temperature=True, temperature=0.05, max_grad_norm=1.0)
# name -> config changes; batch 16 leaves a last micro-batch of 65 % 16 = 1 sample: rank 0 gets none and
# takes part in the step's collectives with a weight-0 stand-in
VARIANTS = {"sharded": {}, "replicated": {"shard_bank": False}, "sharded_last_batch_of_one": {"batch_size": 16},
            "tau_itself": {"temperature_param": "tau"},  # tau learned as itself goes through DDP too
            # the trainer given the bank's file: each rank reads only its rows (NegativeBank.load(shard=...))
            "sharded_from_path": {"from_path": True}}


def _train(from_path=False, **changes):
    images, train, _ = make_world(n_train=45, generated=20)
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    if from_path:
        folder = tempfile.mkdtemp()
        bank.save(f"{folder}/bank.safetensors")
        bank = f"{folder}/bank.safetensors"
    trainer = Stage2Trainer(model, bank, train, images, config=Stage2Config(**{**CONFIG, **changes}))
    if from_path:  # a slice under two ranks, the whole bank in one process
        assert (trainer.bank.shard is not None) == (trainer.world > 1)
    history = trainer.fit()
    weights = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    weights["log_tau"] = (trainer.log_tau if trainer.log_tau is not None else trainer.learned_tau).detach().clone()
    layout = [trainer.negatives.sharded, trainer.negatives.row_offset, len(trainer.negatives.rows)]
    return weights, [h["loss"] for h in history], layout


def _worker(rank: int, world: int, folder: str) -> None:
    for name, changes in VARIANTS.items():
        weights, losses, layout = _train(**changes)
        save_file(weights, f"{folder}/{name}-rank{rank}.safetensors")
        with open(f"{folder}/{name}-rank{rank}.json", "w") as handle:
            json.dump({"losses": losses, "layout": layout}, handle)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    spawn_gloo(_worker, folder)
    return folder


@pytest.mark.slow  # spawns two processes that import torch: ~30-60 s on the shared 2-core box
@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_process_gloo_matches_single_process(two_ranks, name):
    changes = VARIANTS[name]
    expected, expected_losses, single_layout = _train(**changes)
    n_bank = single_layout[2]
    assert single_layout == [False, 0, n_bank]  # one process: never sharded
    layouts = []
    for rank in range(2):
        got = load_file(str(two_ranks / f"{name}-rank{rank}.safetensors"))
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.allclose(got[key], value, atol=1e-5, rtol=1e-5), (name, rank, key)
        run = json.loads((two_ranks / f"{name}-rank{rank}.json").read_text())
        assert run["losses"] == pytest.approx(expected_losses, rel=1e-5)
        layouts.append(run["layout"])
    if changes.get("shard_bank", True):  # each rank held its half of the rows
        assert layouts == [[True, 0, (n_bank + 1) // 2], [True, (n_bank + 1) // 2, n_bank // 2]]
    else:
        assert layouts == [[False, 0, n_bank], [False, 0, n_bank]]
