"""Under two gloo ranks, fit restores the best epoch on every rank: rank 0 evaluates and selects, the
decision is broadcast, and both ranks end on the weights rank 0 evaluated at the best epoch."""

from __future__ import annotations

import pytest
import torch
from _gloo import spawn_gloo
from _toy import make_model, make_world
from safetensors.torch import load_file, save_file

import cir_plugins as cp
from cir_plugins.negatives.bank import NegativeBank

QUERY_SIDE = ("text.weight", "fuse.weight", "fuse.bias")
SCORES = [1.0, 3.0, 2.0]  # the best epoch (2) is not the last


def _worker(rank: int, world: int, folder: str) -> None:
    images, train, _ = make_world(n_train=40)
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    seen = []

    def scripted(m):  # runs on rank 0 only; keeps the weights it evaluated
        seen.append({n: p.detach().clone() for n, p in m.named_parameters() if n in QUERY_SIDE})
        return {"score": SCORES[len(seen) - 1]}

    trainer = cp.Stage2Trainer(model, bank, train, images,
                               config=cp.Stage2Config(epochs=3, batch_size=10, lr=1e-2, show_progress=False),
                               evaluator=cp.Evaluator(scripted, metric="score"))
    trainer.fit()
    final = {n: p.detach().clone() for n, p in model.named_parameters() if n in QUERY_SIDE}
    save_file(final, f"{folder}/final-rank{rank}.safetensors")
    if rank == 0:
        for epoch, weights in enumerate(seen, 1):
            save_file(weights, f"{folder}/epoch{epoch}.safetensors")
    save_file({"best_epoch": torch.tensor(trainer.best_epoch)}, f"{folder}/best-rank{rank}.safetensors")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo-fit")
    spawn_gloo(_worker, folder)
    return folder


@pytest.mark.slow  # two spawned processes: about 30 s on a shared 2-core box
def test_every_rank_ends_on_the_best_epochs_weights(two_ranks):
    best, last = load_file(f"{two_ranks}/epoch2.safetensors"), load_file(f"{two_ranks}/epoch3.safetensors")
    for rank in (0, 1):
        assert int(load_file(f"{two_ranks}/best-rank{rank}.safetensors")["best_epoch"]) == 2
        final = load_file(f"{two_ranks}/final-rank{rank}.safetensors")
        for name in QUERY_SIDE:
            assert torch.equal(final[name], best[name]), (rank, name)
            assert not torch.equal(final[name], last[name]), (rank, name)
