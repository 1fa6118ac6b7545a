"""Run a test body in ``world`` spawned CPU processes joined in one gloo group (file rendezvous in ``folder``).

``body(rank, world, folder)`` must be a module-level function (spawn pickles it by name); each process uses
one intra-op thread and leaves the group when the body ends, raised or not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _join(rank: int, world: int, folder: str, body: Callable[[int, int, str], None]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        body(rank, world, folder)
    finally:
        dist.destroy_process_group()


def spawn_gloo(body: Callable[[int, int, str], None], folder, world: int = 2) -> None:
    """``body`` on ranks 0..world-1 of a gloo group; returns when every rank has finished."""
    mp.spawn(_join, args=(world, str(folder), body), nprocs=world, join=True)
