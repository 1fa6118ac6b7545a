"""A trained result on a model in one line: :func:`load_trained`.

Training writes only the weights it changed (the trainable parameters, plus a learned temperature), so a result
goes on the model it was trained from (the same factory, the same pretrained weights)::

    model = cp.load_trained(make_model(), "runs/stage2")   # a run's output folder: its best checkpoint

``path`` may be a run's output folder (``config.output_dir``, ``--out``: ``checkpoints/best`` when the run
selected one, else ``checkpoints/last``; ``checkpoint=`` picks), one checkpoint folder, a folder written by
:func:`~cir_plugins.share.save_trained`, or a ``.safetensors`` file of parameter names -> tensors. Every saved name
must be a parameter of ``model`` with the same shape (a WrappedModel's ``model.`` prefix is matched either way),
else a CheckpointError names them; parameters the file does not hold (the frozen side) are left as they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ._utils import file_sha256, tensors_digest
from .errors import CheckpointError, explain
from .training.checkpoint import TAU_NAME, TEMPERATURE_NAME, WEIGHTS_FILE, copy_weights, find_checkpoint, has_checkpoint

__all__ = ["TrainedWeights", "read_trained", "load_trained", "apply_trained"]

logger = logging.getLogger(__name__)

SHARED_FILE = "cir_plugins.json"
SHARED_FORMAT = "cir_plugins.trained"


@dataclass
class TrainedWeights:
    """A trained result: ``weights`` (name -> tensor, the temperature removed), ``source`` (the weights file read),
    ``temperature`` (the learned tau, or None), ``info`` (the JSON beside it; empty for a bare file) and
    ``unfinished`` (for a checkpoint of a run that has not finished its epochs, how far it got; else None)."""

    weights: dict[str, torch.Tensor]
    source: Path
    temperature: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    unfinished: str | None = None

    @property
    def fingerprint(self) -> str:
        """A hash of the weights (names, shapes, dtypes, values) and the temperature: the same for a run's checkpoint
        and a ``save_trained`` copy of it, different for any other weights."""
        named = sorted(self.weights.items())
        if self.temperature is not None:
            named.append((TEMPERATURE_NAME, torch.tensor(self.temperature, dtype=torch.float64)))
        return tensors_digest(named)

    @property
    def made_with(self) -> dict[str, Any] | None:
        """What the trainer recorded it was made with (None if nothing): ``preprocessing`` (the image store's
        transform ``kind``, ``size``, normalisation) and ``base`` (the results loaded onto the model before
        training, in order: ``[{"path", "fingerprint"}, ...]``; empty on the bare model)."""
        value = self.info.get("made_with")
        return value if isinstance(value, dict) else None


def _weights_file(path: Path, checkpoint: str | None) -> Path:
    """The weights file ``path`` points at (see the module doc), or CheckpointError saying what was found."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(explain("a trained result is a .safetensors file or a folder", got=str(path), fix=(
                "pass the run's output folder, a checkpoint folder or its weights.safetensors")))
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
    root, names = path / "checkpoints", [checkpoint] if checkpoint is not None else ["best", "last"]
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
    present = sorted(p.name for p in (root if root.is_dir() else path).iterdir())
    raise CheckpointError(explain(f"no {' or '.join(repr(n) for n in names)} checkpoint with weights under {path}",
                                  got=present[:10],
                                  fix="train with output_dir set (cir-plugins stage1/stage2 --out DIR) and pass DIR, "
                                      "or pass a checkpoint folder holding weights.safetensors"))


_SHA256 = re.compile(r"[0-9a-f]{64}")
# the fields of cir_plugins.json that a reader uses -> the JSON types each may hold; others are kept
_JSON_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object", type(None): "null"}
_SHARED_FIELDS: dict[str, tuple[type, ...]] = {
    "version": (int,), "library_version": (str, type(None)), "name": (str, type(None)), "stage": (str, type(None)),
    "trainable": (list,), "trainable_scalars": (int,), "on_top_of": (list,), "base_model": (str, type(None)),
    "config": (dict, type(None)), "best_epoch": (int, type(None)), "history": (list,), "bank": (dict, type(None)),
    "evaluation": (dict,), "recipe": (dict, type(None)), "made_with": (dict, type(None)),
}


def _bad_document(document: Path, problem: str, got: Any, expected: str) -> CheckpointError:
    return CheckpointError(explain(f"{document}: {problem}", got=got, expected=expected,
                                   fix="use the folder as save_trained wrote it: download or copy it again"))


def _read_document(document: Path) -> dict[str, Any]:
    """The JSON object in ``document`` (state.json or cir_plugins.json); CheckpointError otherwise."""
    try:
        info = json.loads(document.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        problem = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise CheckpointError(explain("the result's JSON document is unreadable", got=f"{document}: {problem}",
                                      fix="copy the folder again")) from error
    if not isinstance(info, dict):
        raise _bad_document(document, "not a JSON object", type(info).__name__, "an object")
    trainable = info.get("trainable")
    if trainable is not None and not (isinstance(trainable, list) and all(isinstance(n, str) for n in trainable)):
        raise _bad_document(document, "'trainable' must list parameter names", trainable, "a list of strings")
    return info


def _check_shared(folder: Path, document: Path, info: dict[str, Any]) -> None:
    """CheckpointError naming the field unless the format, types and ``files`` (sizes, SHA-256) are as recorded."""
    if info.get("format") != SHARED_FORMAT:
        raise _bad_document(document, "'format' is missing or not this library's", info.get("format"),
                            repr(SHARED_FORMAT))
    for key, kinds in _SHARED_FIELDS.items():
        value = info.get(key, None if type(None) in kinds else kinds[0]())
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise _bad_document(document, f"field {key!r} has the wrong type", type(value).__name__,
                                " or ".join(_JSON_NAMES[k] for k in kinds))
    files = info.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise _bad_document(document, "'files' must record the size and SHA-256 of each file, the weights included",
                            files if not isinstance(files, dict) else sorted(files),
                            f'{{"{WEIGHTS_FILE}": {{"bytes": n, "sha256": hex}}}}')
    for name, recorded in files.items():
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise _bad_document(document, "'files' may name only files directly inside the folder", name,
                                "a plain file name")
        if not (isinstance(recorded, dict) and isinstance(recorded.get("bytes"), int)
                and not isinstance(recorded.get("bytes"), bool) and isinstance(recorded.get("sha256"), str)
                and _SHA256.fullmatch(recorded["sha256"])):
            raise _bad_document(document, f"'files' entry {name!r} is malformed", recorded,
                                '{"bytes": an integer, "sha256": 64 lowercase hex digits}')
        path = folder / name
        try:
            info_ = path.lstat()
        except OSError as error:
            raise _bad_document(document, f"lists {name!r}, which cannot be found", str(error), "the file") from error
        if not stat.S_ISREG(info_.st_mode):
            raise CheckpointError(explain(f"{path} is not a regular file inside the folder (a link, a folder, ...)",
                                          got=stat.filemode(info_.st_mode),
                                          fix="copy the file itself into the folder"))
        if info_.st_size != recorded["bytes"] or file_sha256(path) != recorded["sha256"]:
            raise CheckpointError(explain(f"{path} differs from the size or SHA-256 recorded in {SHARED_FILE}",
                                          got=info_.st_size, expected=recorded,
                                          fix="download or copy the shared folder again"))


def _temperature(log_tau: torch.Tensor, source: Path) -> float:
    """The saved temperature ``exp(log_tau)``; CheckpointError unless it is one positive finite float."""
    value = float(log_tau.double().reshape(-1)[0]) if log_tau.numel() == 1 else None
    temperature = math.exp(value) if value is not None and -700.0 < value < 700.0 else 0.0
    if not 0.0 < temperature < math.inf:
        raise CheckpointError(explain(f"{source}: the saved log-temperature {TEMPERATURE_NAME!r} is not usable",
                                      got=value if value is not None else tuple(log_tau.shape),
                                      expected="one finite number with exp(log_tau) > 0, e.g. log(0.07) = -2.66",
                                      fix="copy the file again, or remove the entry to keep the model's temperature"))
    return temperature


def read_trained(path: str | os.PathLike, *, checkpoint: str | None = None) -> TrainedWeights:
    """Read a trained result (the paths of the module doc) without touching a model; ``checkpoint``: "best" or
    "last" for a run's output folder (None: "best" when present, else "last")."""
    if checkpoint is not None and checkpoint not in ("best", "last"):
        raise CheckpointError(explain("unknown checkpoint name", got=checkpoint, expected=("best", "last", None)))
    source = _weights_file(Path(path), checkpoint)
    info: dict[str, Any] = {}
    if source.name == WEIGHTS_FILE and Path(path).is_dir() and not stat.S_ISREG(source.lstat().st_mode):
        raise CheckpointError(explain(f"{source} is not a regular file inside the folder (a link, a folder, ...)",
                                      got=stat.filemode(source.lstat().st_mode),
                                      fix="copy the weights file itself into the folder"))
    for name in ("state.json", SHARED_FILE):
        if source.name == WEIGHTS_FILE and (document := source.parent / name).is_file():
            info = _read_document(document)
            if name == SHARED_FILE:
                _check_shared(source.parent, document, info)
            break
    try:
        weights = load_file(str(source), device="cpu")
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a cut or edited file
        raise CheckpointError(explain("the weights file is unreadable (truncated or not safetensors)",
                                      got=f"{source}: {error}",
                                      fix="copy the file again, or load the run's other checkpoint")) from error
    log_tau, tau = weights.pop(TEMPERATURE_NAME, None), weights.pop(TAU_NAME, None)
    if log_tau is None and tau is not None:  # a tau learned as itself: checked in the one log form
        log_tau = tau.double().log()
    temperature = _temperature(log_tau, source) if log_tau is not None else None
    missing = [name for name in info.get("trainable") or () if name not in weights]
    if missing:
        raise CheckpointError(explain(f"the weights file lacks {len(missing)} of the parameters its run trained",
                                      got=f"{source}: {missing[:10]}", fix="copy the checkpoint folder again"))
    if not weights:
        raise CheckpointError(explain("the weights file holds no parameter", got=str(source)))
    if (unfinished := _unfinished(source)) is not None:
        logger.warning("%s comes from a run that has not finished (%s): its best epoch so far; resume the run to "
                       "finish it", source.parent, unfinished)
    return TrainedWeights(weights=weights, source=source, temperature=temperature, info=info, unfinished=unfinished)


def _unfinished(source: Path) -> str | None:
    """"epoch 5 of 40 done" when the run of checkpoint ``source`` has not finished (its newest ``last`` says)."""
    root = source.parent.parent
    if root.name != "checkpoints" or not root.is_dir():
        return None
    last = find_checkpoint(root, "last")
    try:
        state = json.loads((last / "state.json").read_text(encoding="utf-8")) if last is not None else {}
    except (OSError, ValueError):
        return None
    done, total = len(state.get("history") or []), (state.get("config") or {}).get("epochs")
    return f"epoch {done} of {total} done" if isinstance(total, int) and done < total else None


def _name_map(saved: list[str], model_names: set[str]) -> dict[str, str] | None:
    """saved name -> model name: as saved, or across a WrappedModel's ``model.`` prefix; None if neither fits."""
    for rename in (lambda n: n, lambda n: f"model.{n}", lambda n: n.removeprefix("model.")):
        mapping = {name: rename(name) for name in saved}
        if all(target in model_names for target in mapping.values()):
            return mapping
    return None


def load_trained(model: Any, path: str | os.PathLike, *, checkpoint: str | None = None) -> Any:
    """Put the trainable weights of a stage-1 / stage-2 result onto ``model`` and return ``model``.

    Args:
        model: the base model the result was trained from (an ``nn.Module``, wrapped or not).
        path: a run's output folder, a checkpoint folder, a shared folder or a ``.safetensors`` file.
        checkpoint: "best" or "last" for a run's output folder; None = "best" when the run has one.

    A saved name that is not a parameter of ``model``, or another shape, is a CheckpointError naming the file and
    the parameters, and nothing is copied; values are cast to each parameter's dtype and device.
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
            f"{type(model).__name__}", got=f"{result.source}: {unknown[:10]}", expected=sorted(named)[:10],
            fix="build the model the result was trained from (the same factory; wrapped or not does not matter)"))
    copy_weights(result.weights, [(name, named[mapping[name]]) for name in result.weights], source=result.source,
                 fix="build the same model configuration the result was trained with")
    logger.info("loaded %d trained parameter tensors from %s", len(result.weights), result.source)
    return model
