"""A trained result on a model in one line: :func:`load_trained`; and a folder to share: :func:`save_trained`.

Training writes only the weights it changed (the trainable parameters, plus a learned temperature),
so a result is always applied to the model it was trained from: build the same base model (the same
factory, the same pretrained weights), then::

    model = cp.load_trained(make_model(), "runs/stage2")   # a run's output folder: its best checkpoint

``path`` may be

- a run's output folder (``config.output_dir``, ``cir-plugins stage1/stage2 --out``): the checkpoint
  ``checkpoints/best`` when the run selected one, else ``checkpoints/last`` (``checkpoint=`` picks);
- one checkpoint folder (``.../checkpoints/best``), or a folder written by :func:`save_trained`;
- a ``.safetensors`` file of parameter names -> tensors.

Every saved name must be a parameter of ``model`` with the same shape (a :class:`WrappedModel`'s
``model.`` prefix is matched either way); anything else is a :class:`CheckpointError` naming the
names, the shapes and the file. Parameters the file does not hold (the frozen side) are left as they
are. Nothing is unpickled: the weights are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ._utils import file_sha256, tensors_digest
from .errors import CheckpointError, explain

__all__ = ["TrainedWeights", "read_trained", "load_trained", "apply_trained", "TEMPERATURE_NAME"]

logger = logging.getLogger(__name__)

# the learned log-temperature is saved beside the weights under this name (not a model parameter)
TEMPERATURE_NAME = "__temperature__.log_tau"
WEIGHTS_FILE = "weights.safetensors"
# the JSON document of a shared folder (save_trained)
SHARED_FILE = "cir_plugins.json"
SHARED_FORMAT = "cir_plugins.trained"


@dataclass
class TrainedWeights:
    """What a trained result holds: ``weights`` (parameter name -> tensor, the temperature removed),
    ``temperature`` (the learned tau, or None), ``source`` (the weights file read) and ``info`` (the
    JSON beside it: the stage, the config, the history or evaluation table; empty for a bare file)."""

    weights: dict[str, torch.Tensor]
    source: Path
    temperature: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """A hash of the weights (names, shapes, dtypes, values, by name) and the temperature: the same for a
        run's checkpoint and a :func:`save_trained` copy of it, different for any other weights."""
        named = sorted(self.weights.items())
        if self.temperature is not None:
            named.append((TEMPERATURE_NAME, torch.tensor(self.temperature, dtype=torch.float64)))
        return tensors_digest(named)

    @property
    def made_with(self) -> dict[str, Any] | None:
        """What the result was trained with, as its trainer recorded it (None for a result written before
        results recorded it, or a bare weights file): ``preprocessing`` (the image store's description:
        transform ``kind``, ``size``, normalisation) and ``base`` (the results loaded onto the model before
        training, in order: ``[{"path", "fingerprint"}, ...]``; empty for a result trained on the bare
        model, e.g. stage 1)."""
        value = self.info.get("made_with")
        return value if isinstance(value, dict) else None


def _weights_file(path: Path, checkpoint: str | None) -> Path:
    """The weights file ``path`` points at (see the module doc), or CheckpointError saying what was found."""
    from .training.checkpoint import find_checkpoint, has_checkpoint  # noqa: PLC0415 (torch-heavy package)

    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(explain("a trained result is a .safetensors file or a folder", got=str(path),
                                          fix="pass the run's output folder, a checkpoint folder or its "
                                              "weights.safetensors"))
        return path
    if not path.is_dir():
        raise CheckpointError(explain("no trained result at this path", got=str(path),
                                      fix="pass the output folder of a stage-1/stage-2 run (--out / output_dir), "
                                          "a checkpoint folder or a folder written by save_trained"))
    if (path / WEIGHTS_FILE).is_file():
        if checkpoint is not None:
            raise CheckpointError(explain("checkpoint= names a checkpoint of a run folder, but this is one result",
                                          got=f"{path} with checkpoint={checkpoint!r}", fix="leave checkpoint=None"))
        if (path / "state.json").is_file() and find_checkpoint(path.parent, path.name) != path:
            # a training checkpoint records its files' sizes and hashes: this copy does not match them
            raise CheckpointError(explain("the checkpoint folder is incomplete or corrupt", got=str(path),
                                          fix="pass the run's output folder (it takes the newest complete copy), or "
                                              "copy the folder again"))
        return path / WEIGHTS_FILE
    root = path / "checkpoints"
    names = [checkpoint] if checkpoint is not None else ["best", "last"]
    for name in names:
        found = find_checkpoint(root, name) if root.is_dir() else None
        if found is not None and (found / WEIGHTS_FILE).is_file():
            if checkpoint is None and name == "last":
                logger.info("%s has no 'best' checkpoint (the run selected none): loading 'last'", path)
            return found / WEIGHTS_FILE
        if root.is_dir() and has_checkpoint(root, name):  # there, but no complete copy: never another silently
            raise CheckpointError(explain(f"the {name!r} checkpoint under {root} is incomplete or corrupt", got=name,
                                          fix="copy the run folder again" + (", or pass checkpoint='last'"
                                                                              if name == "best" else "")))
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else sorted(p.name for p in path.iterdir())
    raise CheckpointError(explain(f"no {' or '.join(repr(n) for n in names)} checkpoint with weights under {path}",
                                  got=present[:10],
                                  fix="train with output_dir set (cir-plugins stage1/stage2 --out DIR) and pass DIR, "
                                      "or pass a checkpoint folder holding weights.safetensors"))


def read_trained(path: str | os.PathLike, *, checkpoint: str | None = None) -> TrainedWeights:
    """Read a trained result (see the module doc for the accepted paths) without touching a model.

    ``checkpoint``: "best" or "last" for a run's output folder; None = "best" when present, else "last".
    """
    if checkpoint is not None and checkpoint not in ("best", "last"):
        raise CheckpointError(explain("unknown checkpoint name", got=checkpoint, expected=("best", "last", None)))
    source = _weights_file(Path(path), checkpoint)
    try:
        weights = load_file(str(source), device="cpu")
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a cut or edited file
        raise CheckpointError(explain("the weights file is unreadable (truncated or not safetensors)",
                                      got=f"{source}: {error}",
                                      fix="copy the file again, or load the run's other checkpoint")) from error
    info: dict[str, Any] = {}
    for name in ("state.json", SHARED_FILE):
        document = source.parent / name
        if source.name == WEIGHTS_FILE and document.is_file():
            try:
                info = json.loads(document.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise CheckpointError(explain("the result's JSON document is unreadable", got=f"{document}: {error}",
                                              fix="copy the folder again")) from error
            break
    recorded = (info.get("files") or {}).get(WEIGHTS_FILE) if info.get("format") == SHARED_FORMAT else None
    if recorded and (source.stat().st_size != recorded.get("bytes") or file_sha256(source) != recorded.get("sha256")):
        raise CheckpointError(explain(f"{source} differs from the size or SHA-256 recorded in {SHARED_FILE}",
                                      got=source.stat().st_size, expected=recorded,
                                      fix="download or copy the shared folder again"))
    log_tau = weights.pop(TEMPERATURE_NAME, None)
    temperature = float(log_tau.double().exp()) if log_tau is not None else None
    listed = info.get("trainable")
    if listed is not None:
        missing = [name for name in listed if name not in weights]
        if missing:
            raise CheckpointError(explain(f"the weights file lacks {len(missing)} of the parameters its run trained",
                                          got=f"{source}: {missing[:10]}", fix="copy the checkpoint folder again"))
    if not weights:
        raise CheckpointError(explain("the weights file holds no parameter", got=str(source)))
    return TrainedWeights(weights=weights, source=source, temperature=temperature, info=info)


def _name_map(saved: list[str], model_names: set[str]) -> dict[str, str] | None:
    """saved name -> model name: as saved, or across a WrappedModel's ``model.`` prefix; None if neither fits."""
    candidates = (lambda n: n, lambda n: f"model.{n}", lambda n: n.removeprefix("model."))
    for rename in candidates:
        mapping = {name: rename(name) for name in saved}
        if all(target in model_names for target in mapping.values()):
            return mapping
    return None


def load_trained(model: Any, path: str | os.PathLike, *, checkpoint: str | None = None) -> Any:
    """Put the trainable weights of a stage-1 / stage-2 result onto ``model`` and return ``model``.

    Args:
        model: the base model the result was trained from (an ``nn.Module``, wrapped or not).
        path: a run's output folder, a checkpoint folder, a folder from :func:`save_trained`, or a
            ``.safetensors`` file (see the module doc).
        checkpoint: "best" or "last" for a run's output folder; None = "best" when the run has one.

    Raises CheckpointError naming the file and the parameters when a saved name is not a parameter
    of ``model`` or its shape differs; nothing is copied then. Values are cast to each parameter's
    dtype and device. The frozen side is not in the file and is left as it is.
    """
    _parameters_of(model, "load_trained")  # before reading the file
    return apply_trained(model, read_trained(path, checkpoint=checkpoint))


def _parameters_of(model: Any, where: str) -> dict[str, torch.nn.Parameter]:
    """``model``'s parameters by name; CheckpointError naming ``where`` when it is not a module with some."""
    named = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else {}
    if not named:
        raise CheckpointError(explain(f"{where} needs a torch.nn.Module with parameters",
                                      got=type(model).__name__, fix="pass the model the result was trained from"))
    return named


def apply_trained(model: Any, result: TrainedWeights) -> Any:
    """Put an already read result (:func:`read_trained`) onto ``model``; :func:`load_trained` is both steps."""
    named = _parameters_of(model, "apply_trained")
    mapping = _name_map(list(result.weights), set(named))
    if mapping is None:
        unknown = [name for name in result.weights if name not in named]
        raise CheckpointError(explain(
            f"{len(unknown)} of the {len(result.weights)} saved parameters are not parameters of "
            f"{type(model).__name__}", got=f"{result.source}: {unknown[:10]}",
            expected=sorted(named)[:10],
            fix="build the model the result was trained from (the same factory; wrapped or not does not matter)"))
    from .training.checkpoint import copy_weights  # noqa: PLC0415 (the one checked copy: shapes, dtypes)

    copy_weights(result.weights, [(name, named[mapping[name]]) for name in result.weights], source=result.source,
                 fix="build the same model configuration the result was trained with")
    logger.info("loaded %d trained parameter tensors from %s", len(result.weights), result.source)
    return model
