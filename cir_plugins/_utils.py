"""Small private helpers every module shares: eval-mode switching, the model's device, a file's SHA-256, a hash
of named tensors, a rank's rows (atomic writes are in :mod:`cir_plugins._atomic`)."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .errors import ConfigError, explain

__all__ = ["eval_mode", "model_device", "file_sha256", "tensors_digest", "shard_rows"]


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Every module of ``model`` in eval mode inside the block, each one's own flag restored after (not
    ``model.train(flag)``, which would flip submodules left in eval mode on purpose); a non-module passes."""
    modules = list(model.modules()) if callable(getattr(model, "modules", None)) else []
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        yield model
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode


def model_device(model: Any, default: Any = "cpu") -> torch.device | None:
    """The device of ``model``'s (a module, or a bound method of one) first parameter, else first buffer;
    ``default`` (a ``torch.device``, or None) without a module or tensor, or on ``meta`` (offloaded weights)."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", model)
    default = torch.device(default) if default is not None else None
    parameters, buffers = getattr(module, "parameters", None), getattr(module, "buffers", None)
    if not callable(parameters):
        return default
    for tensor in itertools.chain(parameters(), buffers() if callable(buffers) else ()):
        return default if tensor.device.type == "meta" else tensor.device
    return default


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A BLAKE2b-128 hash (hex) of named tensors, in the order given: each name, shape, dtype and the values'
    bytes. Equal only for the same names holding bit-identical tensors (the fingerprint of target-side
    weights and of a trained result)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,): 0-dim tensors too
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` held by ``rank`` of ``world``: contiguous, the first ``n % world`` ranks
    one row more, ranks beyond ``n`` an empty slice."""
    for name, value in (("n", n), ("rank", rank), ("world", world)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(explain(f"{name} must be an int", got=type(value).__name__, fix="pass ints"))
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ConfigError(explain("shard_rows needs n >= 0, world >= 1 and 0 <= rank < world",
                                  got=f"n={n}, rank={rank}, world={world}",
                                  fix="pass torch.distributed.get_rank() and get_world_size()"))
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
