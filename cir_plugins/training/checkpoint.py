"""Training checkpoints: safetensors for tensors, JSON for everything else; nothing pickled.

A checkpoint is a folder (``{output_dir}/checkpoints/last`` or ``.../best``) holding:

- ``weights.safetensors``: the trainable parameters by name (plus ``__temperature__.log_tau`` when
  the temperature is learned);
- ``optimizer.safetensors``: every tensor of the optimiser state, named ``state.<param index>.<key>``;
- ``state.json``: the optimiser's param groups and non-tensor state, the scheduler and GradScaler
  states, the training position (epoch, micro-batch within it, optimiser steps), the history, the
  RNG states (torch CPU / CUDA as base64, python ``random``, numpy) and the config.

The folder is written under a temporary name, every file fsynced, then swapped in by rename, so a
kill at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, explain

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng",
           "flatten_optimizer_state", "unflatten_optimizer_state"]

logger = logging.getLogger(__name__)

FORMAT = "cir_plugins.checkpoint"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``weights`` name -> tensor, ``optimizer`` (a torch optimizer state dict),
    ``state`` (the JSON document)."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """Every RNG state that training touches, as JSON-ready values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": _b64(torch.get_rng_state()),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer state dict into tensors (for safetensors) and a JSON index."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, param_index, key = name.split(".", 2)
        state.setdefault(int(param_index), {})[key] = tensor
    for param_index, entry in index["scalars"].items():
        state.setdefault(int(param_index), {}).update(entry)
    groups = []
    for group in index["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | os.PathLike, name: str, *, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write ``{root}/{name}`` atomically (temp folder, fsync, rename) and return its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    opt_tensors, opt_index = flatten_optimizer_state(optimizer_state)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"),
              metadata={"format": FORMAT})
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": FORMAT})
    document = dict(state, format=FORMAT, optimizer=opt_index)
    (tmp / "state.json").write_text(json.dumps(document))
    for path in tmp.iterdir():
        _fsync_file(path)
    _fsync_dir(tmp)
    old = root / f".old-{name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)
    logger.debug("checkpoint written: %s", final)
    return final


def find_checkpoint(root: str | os.PathLike, name: str) -> Path | None:
    """The folder of checkpoint ``name`` under ``root``; also finds one left mid-swap by a kill."""
    root = Path(root)
    if (root / name / "state.json").is_file():
        return root / name
    leftovers = sorted(root.glob(f".old-{name}-*")) if root.is_dir() else []
    for path in leftovers:
        if (path / "state.json").is_file():
            logger.warning("using checkpoint %s left by an interrupted swap", path)
            return path
    return None


def load_checkpoint(root: str | os.PathLike, name: str = "last", *, device: Any = "cpu") -> Checkpoint:
    """Read the checkpoint ``{root}/{name}``. Missing or incomplete -> CheckpointError."""
    path = find_checkpoint(root, name)
    if path is None:
        raise CheckpointError(explain("no checkpoint to resume from", got=str(Path(root) / name),
                                      fix="run without resume, or point output_dir at a run that wrote checkpoints"))
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "weights.safetensors"), device=str(device))
        opt_tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a cut or edited file
        raise CheckpointError(explain("the checkpoint is incomplete or corrupt", got=f"{path}: {error}",
                                      fix="delete it and start again, or resume from 'best'")) from error
    if state.get("format") != FORMAT:
        raise CheckpointError(explain("not a cir_plugins checkpoint", got=state.get("format"), expected=FORMAT))
    optimizer = unflatten_optimizer_state(opt_tensors, state["optimizer"])
    return Checkpoint(path=path, weights=weights, optimizer=optimizer, state=state)
