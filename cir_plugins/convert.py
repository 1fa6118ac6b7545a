"""Read a checkpoint another project saved with ``torch.save``, without running its code, and keep it as safetensors.

Published CIR checkpoints are pickles: CLIP4Cir ``{"epoch": int, "CLIP" or "Combiner": state_dict}``, SPRC
``{"epoch": int, "Blip2QformerCirAlignPrompt": state_dict}``, LAVIS ``{"model": state_dict, ...}``.
:func:`read_torch_checkpoint` opens one with ``torch.load(weights_only=True)`` (a pickle that would run code is
refused) and returns the state dict inside; :func:`save_safetensors` writes tensors atomically. Renaming to a
model's own names is the model's business (the examples' converters); ``cir-plugins convert`` does both steps.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._atomic import atomic_write_bytes
from .errors import CheckpointError, explain

__all__ = ["read_torch_checkpoint", "save_safetensors", "check_savable"]

logger = logging.getLogger(__name__)


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())


def read_torch_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict[str, Tensor]:
    """The state dict (parameter name -> tensor, on the CPU) inside a ``torch.save`` file.

    Args:
        path: the ``.pt`` / ``.pth`` file.
        key: the entry that holds the state dict (e.g. "CLIP", "Combiner", "model"); None = the file is
            a state dict itself, or holds exactly one (the other entries being numbers, strings, configs).

    A file that needs code to load, a missing or ambiguous key, or non-tensor values are a CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(explain(f"{path}: no such checkpoint file", got=str(path),
                                      fix="pass the .pt/.pth file the project published"))
    if path.stat().st_size == 0:
        raise CheckpointError(explain(f"{path} is empty (0 bytes)", got=str(path),
                                      fix="download or copy the checkpoint again"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError, ValueError,
            NotImplementedError) as error:
        raise CheckpointError(explain(
            f"{path}: cannot be read as weights only (it would need to run code from the pickle, or is not a "
            f"torch.save file): {(str(error).splitlines() or [type(error).__name__])[0]}",
            fix="re-save it where its code is trusted as torch.save(model.state_dict(), path); this project "
                "never unpickles code")) from error
    if _is_state_dict(obj):
        if key is not None:
            raise CheckpointError(explain(f"{path} is a bare state dict; it has no entry {key!r}", got=key,
                                          fix="leave the key out"))
        return dict(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(explain(f"{path} holds a {type(obj).__name__}, not a state dict or a dict of them",
                                      got=type(obj).__name__, fix="pass a checkpoint saved from a state_dict()"))
    candidates = sorted(k for k, v in obj.items() if _is_state_dict(v))
    if key is None:
        if len(candidates) != 1:
            raise CheckpointError(explain(f"{path}: cannot tell which entry is the state dict",
                                          got=sorted(map(str, obj)), expected=candidates or "one dict of tensors",
                                          fix="name it with key=... (--key on the command line)"))
        key = candidates[0]
    if key not in obj:
        raise CheckpointError(explain(f"{path} has no entry {key!r}", got=sorted(map(str, obj)),
                                      expected=candidates, fix="pick one of the entries that hold tensors"))
    if not _is_state_dict(obj[key]):
        raise CheckpointError(explain(f"{path}: entry {key!r} is not a name -> tensor mapping",
                                      got=type(obj[key]).__name__, expected=candidates))
    logger.info("read %d tensors from %s[%r]", len(obj[key]), path, key)
    return dict(obj[key])


def check_savable(name: Any, tensor: Any) -> None:
    """CheckpointError unless ``name`` -> ``tensor`` can go into a safetensors file: a non-empty name other than
    ``__metadata__``, and a dense tensor with data (not sparse, quantized or on the ``meta`` device)."""
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise CheckpointError(explain("a tensor name safetensors cannot store", got=name,
                                      expected="a non-empty name other than '__metadata__' (the file header's own key)",
                                      fix="rename the tensor before saving"))
    if not torch.is_tensor(tensor):
        raise CheckpointError(explain(f"cannot save {name!r}: not a tensor", got=type(tensor).__name__))
    if tensor.layout != torch.strided or tensor.is_quantized:
        kind = str(tensor.layout) if tensor.layout != torch.strided else "a quantized tensor"
        raise CheckpointError(explain(f"cannot save {name!r}: safetensors holds dense tensors only", got=kind,
                                      expected="torch.strided",
                                      fix="convert it with .to_dense() / .dequantize() first"))
    if tensor.is_meta:
        raise CheckpointError(explain(f"cannot save {name!r}: a tensor on the 'meta' device has no values",
                                      got=tuple(tensor.shape), fix="load the real weights before converting"))


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """``tensors`` as one safetensors file with string ``metadata`` (on the CPU, contiguous; tensors sharing storage
    are copied, since safetensors refuses tied or viewed weights)."""
    from safetensors.torch import save
    seen, out = set(), {}  # storages already written
    for name, tensor in tensors.items():
        check_savable(name, tensor)
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return save(out, metadata=dict(metadata) if metadata else None)


def save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """:func:`safetensors_bytes` written to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))
