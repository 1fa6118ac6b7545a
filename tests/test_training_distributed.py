"""Two CPU processes (gloo) train stage 2 to the same weights and losses as one process."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training import Stage2Config, Stage2Trainer
from test_training_toy import make_model, make_world

# batch 15 over 2 ranks: uneven slices (7 + 8), and a last micro-batch of 65 % 15 = 5 (2 + 3)
CONFIG = dict(epochs=2, batch_size=15, lr=1e-2, show_progress=False, select_metric=None,
              learn_temperature=True, temperature=0.05, max_grad_norm=1.0)


def _train():
    images, train, _ = make_world(n_train=45, generated=20)
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    trainer = Stage2Trainer(model, bank, train, images, config=Stage2Config(**CONFIG))
    history = trainer.fit()
    weights = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    weights["log_tau"] = trainer.log_tau.detach().clone()
    return weights, [h["loss"] for h in history]


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        weights, losses = _train()
        save_file(weights, f"{folder}/rank{rank}.safetensors")
        with open(f"{folder}/rank{rank}.json", "w") as handle:
            json.dump(losses, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes that import torch: ~30-60 s on the shared 2-core box
def test_two_process_gloo_matches_single_process(tmp_path):
    expected, expected_losses = _train()
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for name, value in expected.items():
            assert torch.allclose(got[name], value, atol=1e-5, rtol=1e-5), (rank, name)
        losses = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert losses == pytest.approx(expected_losses, rel=1e-5)
