"""Training checkpoints: safetensors for tensors, JSON for everything else; nothing pickled.

A checkpoint is a folder (``{output_dir}/checkpoints/last`` or ``.../best``): ``weights.safetensors`` (the
trainable parameters by name, plus the learned temperature), ``optimizer.safetensors`` (the optimiser's tensors,
``state.<param index>.<key>``) and ``state.json`` (param groups and non-tensor optimiser state, scheduler and
GradScaler states, the position: epoch, micro-batch, optimiser steps; the history, the RNG states, the config).

It is written as ``.tmp-<name>-<pid>-<unique>``, every file fsynced, ``state.json`` last (recording each file's
size and SHA-256 and its own checksum), then swapped in by rename (the previous folder is ``.old-<name>-...``
between the two renames), so a kill at any moment leaves the previous checkpoint whole. Reading considers
``<name>`` and every such leftover, keeps the complete ones and takes the highest recorded position (``<name>``
wins a tie); incomplete copies are logged and skipped, and a successful save removes every leftover.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._atomic import atomic_write_bytes, fsync_file, replace_folder
from .._utils import file_sha256
from ..errors import CheckpointError, explain

__all__ = ["Checkpoint", "copy_weights", "save_checkpoint", "load_checkpoint", "find_checkpoint", "has_checkpoint",
           "capture_rng", "restore_rng", "flatten_optimizer_state", "unflatten_optimizer_state", "restore_weights",
           "restore_optimizer", "triplets_fingerprint", "bank_fingerprint"]

logger = logging.getLogger(__name__)

FORMAT = "cir_plugins.checkpoint"
WEIGHTS_FILE = "weights.safetensors"
# a learned temperature, saved beside the weights (not a model parameter): log tau, or tau itself (temperature_param)
TEMPERATURE_NAME = "__temperature__.log_tau"
TAU_NAME = "__temperature__.tau"
OPTIMIZER_FILE = "optimizer.safetensors"
_RESTORE = "restore the checkpoint folder from a copy, or start the run again"
STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``weights`` name -> tensor, ``optimizer`` (a torch state dict), ``state`` (the JSON)."""

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
    np_state, py_state = np.random.get_state(), random.getstate()
    out = {"torch": _b64(torch.get_rng_state()), "python": [py_state[0], list(py_state[1]), py_state[2]],
           "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any], *, source: object = "the checkpoint") -> None:
    """Inverse of :func:`capture_rng`; a malformed state is a CheckpointError naming ``source``."""
    try:
        torch.set_rng_state(_unb64(state["torch"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, binascii.Error) as error:
        raise CheckpointError(explain(f"the RNG state in {source} is malformed", got=f"{type(error).__name__}: {error}",
                                      fix=_RESTORE)) from error


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
        prefix, param_index, key = name.split(".", 2)
        if prefix != "state":
            raise ValueError(f"unexpected tensor name {name!r}")
        state.setdefault(int(param_index), {})[key] = tensor
    for param_index, entry in index["scalars"].items():
        state.setdefault(int(param_index), {}).update(entry)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in index["param_groups"]]
    return {"state": state, "param_groups": groups}


def _hash_json(value: Any, sort_keys: bool = False) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=sort_keys, separators=(",", ":")).encode()).hexdigest()


def _document_checksum(document: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``document`` without its ``checksum`` key (as read back from JSON)."""
    return _hash_json({k: v for k, v in json.loads(json.dumps(document)).items() if k != "checksum"}, sort_keys=True)


def _leftovers(root: Path, name: str) -> list[Path]:
    """Folders a killed or interrupted save of ``name`` may have left: ``.old-<name>-*``, ``.tmp-<name>-*``."""
    return sorted(p for kind in (".old", ".tmp") for p in root.glob(f"{kind}-{name}-*")) if root.is_dir() else []


def _remove_leftovers(root: Path, name: str) -> None:
    for path in _leftovers(root, name):
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as error:  # another owner, a read-only copy: the leftover is skipped on reading anyway
            logger.warning("could not remove the checkpoint leftover %s: %s", path, error)


def save_checkpoint(root: str | os.PathLike, name: str, *, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write ``{root}/{name}`` atomically (see the module doc) and return its path."""
    root, unique = Path(root), f"{os.getpid()}-{time.time_ns():x}-{os.urandom(4).hex()}"  # never a leftover's name
    (tmp := root / f".tmp-{name}-{unique}").mkdir(parents=True)
    opt_tensors, opt_index = flatten_optimizer_state(optimizer_state)
    files = {}
    for file_name, tensors in ((WEIGHTS_FILE, {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}),
                               (OPTIMIZER_FILE, opt_tensors)):
        save_file(tensors, str(tmp / file_name), metadata={"format": FORMAT})
        fsync_file(tmp / file_name)
        files[file_name] = {"bytes": (tmp / file_name).stat().st_size, "sha256": file_sha256(tmp / file_name)}
    document = dict(state, format=FORMAT, optimizer=opt_index, files=files)
    document["checksum"] = _document_checksum(document)
    atomic_write_bytes(tmp / STATE_FILE, json.dumps(document).encode("utf-8"))  # written last, fsynced
    replace_folder(tmp, root / name, root / f".old-{name}-{unique}")  # the old folder is a leftover until removed
    _remove_leftovers(root, name)
    logger.debug("checkpoint written: %s", root / name)
    return root / name


def _inspect(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(state, None) when the folder ``path`` is a complete checkpoint, else (None, why not)."""
    document_path = path / STATE_FILE
    if not document_path.is_file():
        return None, "no state.json (the save was cut short)"
    try:
        state = json.loads(document_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        return None, f"state.json is unreadable ({type(error).__name__}: {error})"
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None, f"state.json is not a {FORMAT} document"
    if "checksum" in state and state["checksum"] != _document_checksum(state):
        return None, "state.json does not match its checksum (edited or corrupt)"
    files = state.get("files", {WEIGHTS_FILE: None, OPTIMIZER_FILE: None})
    if not isinstance(files, dict):
        return None, "state.json lists its files wrongly"
    for file_name, expected in files.items():
        if not (file_path := path / str(file_name)).is_file():
            return None, f"{file_name} is missing"
        if expected is None:  # a checkpoint from before the sizes and hashes were recorded
            continue
        if not isinstance(expected, dict):
            return None, "state.json lists its files wrongly"
        if file_path.stat().st_size != expected.get("bytes") or file_sha256(file_path) != expected.get("sha256"):
            return None, f"{file_name} differs from the size or SHA-256 recorded in state.json (cut, edited or corrupt)"
    return state, None


def _position(state: dict[str, Any]) -> tuple:
    values = [state.get(key) for key in ("global_step", "epoch", "micro")]
    return tuple(v if isinstance(v, int) and not isinstance(v, bool) else -1 for v in values)


def _select(root: Path, name: str) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest complete copy of checkpoint ``name``: (path, state, the problems of the skipped copies)."""
    best, problems = None, []
    for path in ([root / name] if (root / name).exists() else []) + _leftovers(root, name):
        state, problem = _inspect(path) if path.is_dir() else (None, "not a folder")
        if state is None:
            problems.append(f"{path.name}: {problem}")
            continue
        key = _position(state) + (path == root / name,)
        if best is None or key > best[0]:
            best = (key, path, state)
    if problems:
        logger.warning("skipping incomplete checkpoint copies under %s: %s", root, "; ".join(problems))
    if best is None:
        return None, None, problems
    if best[1] != root / name:
        logger.warning("using checkpoint %s (step %d) left by an interrupted save: the newest complete copy",
                       best[1], best[0][0])
    return best[1], best[2], problems


def has_checkpoint(root: str | os.PathLike, name: str) -> bool:
    """Whether ``{root}/{name}`` or any leftover of an interrupted save of it exists (complete or not)."""
    return (Path(root) / name).exists() or bool(_leftovers(Path(root), name))


def find_checkpoint(root: str | os.PathLike, name: str) -> Path | None:
    """The folder of the newest complete copy of checkpoint ``name`` under ``root`` (itself or a leftover), or None."""
    return _select(Path(root), name)[0]


_STATE_TYPES: dict[str, tuple] = {
    "stage": (str,), "config": (dict,), "trainable": (list,), "epoch": (int,), "micro": (int,),
    "global_step": (int,), "epoch_stats": (dict,), "history": (list,), "best": (int, float, type(None)),
    "rng": (dict,), "scheduler": (dict, type(None)), "scaler": (dict, type(None)), "optimizer": (dict,),
}
_STATS_KEYS = ("loss_sum", "micro_batches", "steps", "samples", "time")


def _check_state(state: dict[str, Any], path: Path) -> None:
    """CheckpointError naming the key when the training state document has a missing or mistyped entry."""
    def fail(key: str, got: object, expected: str) -> None:
        raise CheckpointError(explain(f"{path / 'state.json'}: the entry {key!r} is missing or malformed",
                                      got=got, expected=expected,
                                      fix="restore the checkpoint folder from a copy (state.json is written by the "
                                          "trainer, not edited), or start the run again"))

    for key, kinds in _STATE_TYPES.items():
        value = state.get(key, KeyError)
        if value is KeyError or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            fail(key, "missing" if value is KeyError else type(value).__name__, "/".join(k.__name__ for k in kinds))
    for key in ("epoch", "micro", "global_step"):
        if state[key] < 0:
            fail(key, state[key], "an int >= 0")
    if not all(isinstance(n, str) for n in state["trainable"]):
        fail("trainable", state["trainable"][:5], "a list of parameter names")
    stats = state["epoch_stats"]
    if any(not isinstance(stats.get(k), (int, float)) or isinstance(stats.get(k), bool) for k in _STATS_KEYS):
        fail("epoch_stats", sorted(stats)[:10], f"numbers {list(_STATS_KEYS)}")
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(optimizer.get("scalars"), dict) \
            or not all(isinstance(g, dict) for g in optimizer["param_groups"]):
        fail("optimizer", sorted(optimizer)[:10], "param_groups (a list of objects) and scalars (an object)")
    fingerprints = state.get("fingerprints", {})
    if not isinstance(fingerprints, dict) or not all(isinstance(v, (str, type(None))) for v in fingerprints.values()):
        fail("fingerprints", fingerprints, "an object of hash strings")


def load_checkpoint(root: str | os.PathLike, name: str = "last", *, device: Any = "cpu") -> Checkpoint:
    """Read the newest complete copy of checkpoint ``{root}/{name}``; CheckpointError when there is none (naming
    each incomplete copy and why) or its state document is malformed."""
    root = Path(root)
    path, state, problems = _select(root, name)
    if path is None:
        if problems:
            raise CheckpointError(explain("the checkpoint is incomplete or corrupt, and no complete copy is left",
                                          got=problems[:5],
                                          fix="restore the folder from a copy, resume from 'best', or start again "
                                              "without resume in a new output_dir"))
        raise CheckpointError(explain("no checkpoint to resume from", got=str(root / name),
                                      fix="run without resume, or point output_dir at a run that wrote checkpoints"))
    try:
        weights, opt_tensors = (load_file(str(path / f), device=str(device)) for f in (WEIGHTS_FILE, OPTIMIZER_FILE))
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a cut or edited file
        raise CheckpointError(explain("the checkpoint is incomplete or corrupt", got=f"{path}: {error}",
                                      fix="delete it and start again, or resume from 'best'")) from error
    _check_state(state, path)
    try:
        optimizer = unflatten_optimizer_state(opt_tensors, state["optimizer"])
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(explain(f"{path / 'optimizer.safetensors'}: the optimiser state is malformed",
                                      got=f"{type(error).__name__}: {error}",
                                      fix=_RESTORE)) from error
    return Checkpoint(path=path, weights=weights, optimizer=optimizer, state=state)


def copy_weights(weights: dict[str, torch.Tensor], named: list[tuple[str, torch.Tensor]], *, source: Any,
                 fix: str) -> None:
    """Copy ``weights[name]`` into each (name, parameter) of ``named``, cast to its dtype and device, after checking
    every one: a missing name, another shape or a non-floating tensor is a CheckpointError naming the parameter and
    ``source``, and nothing is copied. Resume, ``load_weights`` and :func:`cir_plugins.load_trained` use it."""
    problems = []
    for name, parameter in named:
        saved = weights.get(name)
        if saved is None:
            problems.append(f"{name}: missing")
        elif tuple(saved.shape) != tuple(parameter.shape):
            problems.append(f"{name}: saved {tuple(saved.shape)}, model {tuple(parameter.shape)}")
        elif not saved.is_floating_point():
            problems.append(f"{name}: saved dtype {saved.dtype}")
    if problems:
        raise CheckpointError(explain(f"{source}: {len(problems)} saved weights do not fit the model's parameters",
                                      got=problems[:10], expected="every parameter with its own shape", fix=fix))
    with torch.no_grad():
        for name, parameter in named:
            parameter.copy_(weights[name])


def restore_weights(checkpoint: Checkpoint, named: list[tuple[str, torch.Tensor]]) -> None:
    """Copy the checkpoint's tensors into ``named`` (name, parameter) pairs, checked (:func:`copy_weights`)."""
    copy_weights(checkpoint.weights, named, source=checkpoint.path / WEIGHTS_FILE,
                 fix="resume with the model the checkpoint was trained from, or start again")


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Load the checkpoint's optimiser state after checking it fits ``optimizer`` (CheckpointError else): each
    per-parameter tensor a scalar (``step``) or of its parameter's shape."""
    where, saved, problems = checkpoint.path / OPTIMIZER_FILE, checkpoint.optimizer, []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in saved["state"].items():
        if not 0 <= index < len(params):
            problems.append(f"state of parameter {index}: no such parameter (the optimiser has {len(params)})")
            continue
        for key, value in entry.items():
            if torch.is_tensor(value) and value.numel() != 1 and tuple(value.shape) != tuple(params[index].shape):
                problems.append(f"state.{index}.{key}: saved {tuple(value.shape)}, parameter "
                                f"{tuple(params[index].shape)}")
    if problems:
        raise CheckpointError(explain(f"{where}: the optimiser state does not fit the parameters", got=problems[:10],
                                      fix="restore the checkpoint folder from a copy, or start again"))
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        raise CheckpointError(explain(f"{where}: the optimiser state does not load",
                                      got=f"{type(error).__name__}: {error}",
                                      fix="restore the checkpoint folder from a copy, or start again")) from error


def triplets_fingerprint(triplets: list) -> str:
    """SHA-256 over the ordered training triplets (reference, texts, target, source): what sampler positions index."""
    return _hash_json([[t.reference, list(t.texts), t.target, t.source] for t in triplets])


def bank_fingerprint(bank: Any) -> str:
    """SHA-256 over a bank's ids, their rows and the fingerprint of the weights that built it."""
    return _hash_json([list(bank.ids), [bank.row_of(i) for i in bank.ids], str(bank.fingerprint)])
