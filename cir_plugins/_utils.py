"""Small helpers every module shares (private): eval-mode switching, the model's device, a file's SHA-256, a
hash of named tensors.

One implementation each; atomic file writes are in :mod:`cir_plugins._atomic`, image embedding is
:func:`cir_plugins.evaluation.embed_images`, trainable-name resolution is
:func:`cir_plugins.protocol.select_trainable`.
"""

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
    """Every module of ``model`` in eval mode inside the block; each module's own flag restored after.

    Module by module rather than ``model.train(flag)``, which would also flip submodules deliberately
    left in eval mode (a frozen batch-norm backbone inside a wrapper in train mode). A model that is
    not an ``nn.Module`` (no ``modules()``) passes through untouched.
    """
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
    """The device of ``model``'s first parameter (else first buffer).

    ``model`` may be a module or a bound method of one (``model.encode_image``). Returns ``default``
    (as a ``torch.device``; None stays None) when there is no module, it holds no tensor, or its
    tensors are on ``meta`` (weights offloaded: the model's own hooks place the inputs).
    """
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", model)
    default = torch.device(default) if default is not None else None
    parameters = getattr(module, "parameters", None)
    buffers = getattr(module, "buffers", None)
    if not callable(parameters):
        return default
    tensors = itertools.chain(parameters(), buffers() if callable(buffers) else ())
    for tensor in tensors:
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
    """Rows ``[start, stop)`` of ``n`` rows (a bank, a list of images) held by ``rank`` out of ``world``.

    Contiguous, balanced: the first ``n % world`` ranks hold one extra row. Ranks beyond ``n``
    hold an empty slice.
    """
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
