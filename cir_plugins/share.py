"""Share a trained result: a folder a user can publish (:func:`save_trained`) and its upload (:func:`push_to_hub`).

The folder holds ``weights.safetensors`` (the trainable weights and a learned temperature, by name),
``cir_plugins.json`` (format, stage, config, the bank's fingerprints, the evaluation table, the history, what it
was made with, each file's size and SHA-256) and ``README.md`` (a model card). The weights go on the base model
they were trained from; a stage-2 result on top of a stage-1 run saves both with ``on_top_of=["runs/stage1"]``::

    cp.save_trained("runs/stage2", "share/my-model", on_top_of=["runs/stage1"], bank=bank,
                    evaluation={"CIRR val": cp.evaluate(model, val)}, base_model="my_factory.py:build")
    cp.push_to_hub("share/my-model", "me/my-model")              # needs huggingface_hub and a token
    model = cp.load_trained(build(), "share/my-model")             # anyone, after downloading the folder

``huggingface_hub`` is optional (``pip install "cir_plugins[hub]"``); nothing else here uses the network."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._atomic import atomic_write_bytes, atomic_write_json, folder_writer
from .convert import safetensors_bytes
from .errors import CheckpointError, ConfigError, HubError, explain
from .trained import SHARED_FILE, SHARED_FORMAT, read_trained
from .training.checkpoint import TAU_NAME, TEMPERATURE_NAME, WEIGHTS_FILE, bank_fingerprint

__all__ = ["save_trained", "push_to_hub", "model_card", "check_repo_id"]

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
# a part of a Hub repository id [namespace/]name: letters, digits, '-_.', a letter or digit at both ends, <= 96
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#!])")


def check_repo_id(repo_id: Any) -> str:
    """``repo_id`` when it is a valid Hub repository id (``name`` or ``namespace/name``), else ConfigError."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if not (1 <= len(parts) <= 2 and all(_REPO_PART.fullmatch(part) for part in parts)
            and "--" not in repo_id and ".." not in repo_id):
        raise ConfigError(explain("not a Hugging Face Hub repository id", got=repo_id,
                                  expected="'name' or 'namespace/name': letters, digits, '-', '_', '.', at most 96 "
                                           "characters each, no '--' or '..'",
                                  fix="e.g. --push me/my-model"))
    return repo_id


def _md(text: Any) -> str:
    """``text`` as Markdown that shows it literally on one line (no HTML, links, emphasis or table cells)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _code(text: Any) -> str:
    """``text`` as an inline code span on one line that no backtick or table pipe inside it can end."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _from_trainer(trainer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """(weights incl. temperature, info, bank or None) of a trainer after ``fit`` (its model's weights now)."""
    weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in trainer._named_state().items()}
    if (tau := weights.pop(TAU_NAME, None)) is not None:  # a tau learned as itself is shared in the one log form
        weights[TEMPERATURE_NAME] = tau.double().log().float()
    info = {"stage": trainer.stage, "config": trainer.config.to_dict(), "history": list(trainer.history),
            "best_epoch": getattr(trainer, "best_epoch", None), "made_with": getattr(trainer, "made_with", None)}
    return weights, info, getattr(trainer, "bank", None)


def _from_path(path: str | os.PathLike, checkpoint: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    result = read_trained(path, checkpoint=checkpoint)
    weights = dict(result.weights)
    if result.temperature is not None:
        weights[TEMPERATURE_NAME] = torch.tensor(math.log(result.temperature), dtype=torch.float32)
    info = {key: result.info[key] for key in ("stage", "config", "history", "best_epoch", "bank", "evaluation",
                                             "base_model", "recipe") if key in result.info}
    info.update(made_with=result.made_with, fingerprint=result.fingerprint, source=str(result.source))
    if "bank" not in info and (bank := (result.info.get("fingerprints") or {}).get("bank")):
        info["bank"] = {"content_fingerprint": bank}
    return weights, info


def _shared_made_with(made_with: Any, merged: list[dict[str, str]], source: Any) -> dict[str, Any] | None:
    """``made_with`` less the merged ``on_top_of`` results; ConfigError unless they end the recorded base, in order."""
    if not isinstance(made_with, dict):
        return None
    if "base" not in made_with or not merged:
        return dict(made_with)
    base = [b for b in made_with.get("base") or () if isinstance(b, dict)]
    kept = base[:len(base) - len(merged)] if len(merged) <= len(base) else []
    if [b.get("fingerprint") for b in base[len(kept):]] != [m["fingerprint"] for m in merged]:
        named = ", then ".join(str(b.get("path")) for b in base) or "nothing (the factory's model)"
        raise ConfigError(explain(f"{source} was trained on top of {named}, but on_top_of merges other results",
                                  got=[m["path"] for m in merged], expected=[b.get("path") for b in base],
                                  fix="pass on_top_of the results it was trained on, in training order"))
    return {**made_with, "base": kept}


def _bank_info(bank: Any) -> dict[str, Any]:
    return {"fingerprint": str(bank.fingerprint), "content_fingerprint": bank_fingerprint(bank),
            "rows": int(bank.embeddings.shape[0]), "ids": len(bank.ids), "similarity": bank.similarity,
            "shape": list(bank.embeddings.shape[1:])}


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _evaluation_table(evaluation: Mapping[str, Any] | None, info: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """name -> {metric: value}: ``evaluation`` (a flat dict is one row), else the selected epoch's validation."""
    if evaluation:
        nested = all(isinstance(v, Mapping) for v in evaluation.values())
        return {str(k): _numbers(v) for k, v in (evaluation if nested else {"evaluation": evaluation}).items()}
    history = [e for e in info.get("history") or [] if e.get("metrics")]
    if not history:
        return {}
    entry = next((e for e in history if e.get("epoch") == info.get("best_epoch")), history[-1])
    return {f"validation during training (epoch {entry['epoch']})": _numbers(entry["metrics"])}


def model_card(document: Mapping[str, Any], *, title: str | None = None) -> str:
    """The README.md of a shared folder from its ``cir_plugins.json`` document; every name and value taken from it
    is escaped (it shows as written, never as Markdown or HTML)."""
    title = title or document.get("name") or "A composed image retrieval model trained with cir_plugins"
    stage = str(document.get("stage") or "?")
    lines = ["---", "library_name: cir_plugins", "tags:", "- composed-image-retrieval", "- cir_plugins", "---", "",
             f"# {_md(title)}", "",
             f"The trainable weights of a {_md(stage.replace('stage', 'stage-'))} result of the cir_plugins library "
             f"(version {_md(document.get('library_version', '?'))}): "
             f"{len(document.get('trainable', []))} parameter tensors, "
             f"{document.get('trainable_scalars', 0):,} values. They go on the base model they were trained from; "
             "the rest of that model is not in this folder.", "",
             "## How to load it", "", "```python", "import cir_plugins as cp", ""]
    base = document.get("base_model")
    lines += [f"model = build()  # the base model: {' '.join(str(base).split())}" if base else
              "model = build()  # the base model this result was trained from (same factory, same pretrained weights)",
              "model = cp.load_trained(model, \"path/to/this/folder\")  # names and shapes are checked",
              "```", "",
              "From the Hub: `huggingface_hub.snapshot_download(repo_id)` gives the folder to pass to `load_trained`.",
              "On the command line: `cir-plugins evaluate --model FACTORY --trained path/to/this/folder ...`.", ""]
    table = document.get("evaluation") or {}
    lines += ["## Evaluation", ""]
    if table:
        metrics = list(dict.fromkeys(k for row in table.values() for k in row))
        lines += ["| | " + " | ".join(map(_md, metrics)) + " |", "|---|" + "---|" * len(metrics)]
        for name, row in table.items():
            lines.append(f"| {_md(name)} | " + " | ".join(f"{row[m]:.2f}" if m in row else "" for m in metrics) + " |")
        lines += ["", "Recalls in percent; each row is named by the split (and protocol) it was measured on."]
    else:
        lines.append("No evaluation was recorded with this result.")
    bank = document.get("bank") or {}
    lines += ["", "## The negative bank", ""]
    if bank:
        lines += [f"- target-side fingerprint (the weights that built the bank): {_code(bank.get('fingerprint', '?'))}",
                  f"- content fingerprint (ids, rows, weights): {_code(bank.get('content_fingerprint', '?'))}"]
        if "rows" in bank:
            lines.append(f"- {_md(bank['rows'])} rows for {_md(bank.get('ids'))} image ids, similarity "
                         f"{_md(repr(bank.get('similarity')))}, row shape {_md(bank.get('shape'))}")
        lines += ["", "A bank built by the loaded model has the same target-side fingerprint "
                  "(`NegativeBank.build(...).fingerprint`); another fingerprint means another base model."]
    else:
        lines.append("No bank was recorded (a stage-1 result trains against in-batch negatives).")
    recipe, config = document.get("recipe"), document.get("config") or {}
    lines += ["", "## Recipe", ""]
    if recipe:
        lines += ["```json", json.dumps(recipe, indent=1, sort_keys=True), "```", ""]
    if config:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {_md(key)} | {_code(json.dumps(value))} |" for key, value in config.items()
                  if key not in ("output_dir", "show_progress")]
    history = document.get("history") or []
    if history:
        names = _numbers(history[-1].get("metrics", {}))
        lines += ["", "## Training history", "", "| epoch | loss | steps | " + " | ".join(map(_md, names)) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for entry in history:
            values = _numbers(entry.get("metrics", {}))
            lines.append(f"| {_md(entry.get('epoch'))} | {entry.get('loss', float('nan')):.4f} | "
                         f"{_md(entry.get('steps'))} | " + " | ".join(f"{v:.2f}" for v in values.values()) + " |")
        if document.get("best_epoch"):
            lines.append(f"\nThe weights are those of epoch {_md(document['best_epoch'])} (the best by the evaluator).")
    return "\n".join(lines) + "\n"


def save_trained(source: Any, folder: str | os.PathLike, *, on_top_of: Sequence[str | os.PathLike] = (),
                 bank: Any = None, evaluation: Mapping[str, Any] | None = None, base_model: str | None = None,
                 recipe: Mapping[str, Any] | None = None, name: str | None = None, checkpoint: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write a stage-1 / stage-2 result as a folder to publish (see the module doc), atomically; returns it.

    Args:
        source: a trainer after ``fit`` (its model's current weights), or a path :func:`cir_plugins.load_trained`
            accepts (a run's output folder, a checkpoint folder, ...).
        folder: the folder to write (a new one; ``overwrite=True`` replaces an existing one).
        on_top_of: earlier results this one was trained on (e.g. the stage-1 run under a stage-2 run), merged
            under its weights so one ``load_trained`` reproduces the model (ConfigError unless they are the
            results it recorded it was trained on, in that order).
        bank: the NegativeBank of a stage-2 result (default: a stage-2 trainer's own); its fingerprints are recorded.
        evaluation: ``{row name: cp.evaluate(...) dict}`` or one such dict; default: the selected epoch's
            validation metrics from the history.
        base_model: how to build the base model (e.g. "my_factory.py:build" or a Hub model id), for the card.
        recipe: a JSON-ready description of how the result was made, for the card.
        name: the card's title.
        checkpoint: "best" or "last" when ``source`` is a run folder (default: best when present).
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ConfigError(explain("the folder to share into exists", got=str(folder),
                                  fix="choose a new folder, or pass overwrite=True to replace it"))
    if hasattr(source, "_named_state") and hasattr(source, "config"):
        weights, info, trainer_bank = _from_trainer(source)
        bank = bank if bank is not None else trainer_bank
    elif isinstance(source, (str, os.PathLike)):
        weights, info = _from_path(source, checkpoint)
    else:
        raise ConfigError(explain("save_trained needs a trainer or the path of a trained result",
                                  got=type(source).__name__, fix="pass the trainer after fit, or its output_dir"))
    merged, merged_from = {}, []
    for earlier in on_top_of:
        below, below_info = _from_path(earlier, None)
        merged.update({k: v for k, v in below.items() if k != TEMPERATURE_NAME})  # the temperature is this result's
        merged_from.append({"path": str(earlier), "fingerprint": below_info["fingerprint"]})
    made_with = _shared_made_with(info.get("made_with"), merged_from, info.get("source", "the trainer's result"))
    merged.update(weights)
    parameters = {k: v for k, v in merged.items() if k != TEMPERATURE_NAME}
    document: dict[str, Any] = {
        "format": SHARED_FORMAT, "version": 1, "library_version": __version__, "name": name,
        "stage": info.get("stage"), "trainable": sorted(parameters),
        "trainable_scalars": sum(t.numel() for t in parameters.values()),
        "on_top_of": [str(p) for p in on_top_of], "base_model": base_model or info.get("base_model"),
        "config": info.get("config"), "best_epoch": info.get("best_epoch"), "history": info.get("history") or [],
        "bank": _bank_info(bank) if bank is not None else info.get("bank"),
        "evaluation": _evaluation_table(evaluation, info) or info.get("evaluation") or {},
        "recipe": dict(recipe) if recipe is not None else info.get("recipe"),
        "made_with": made_with,
    }
    try:
        json.dumps(document)
    except TypeError as error:
        raise ConfigError(explain("the recipe or evaluation is not JSON-ready", got=str(error),
                                  fix="pass plain dicts, lists, strings and numbers")) from error
    data = safetensors_bytes(merged, metadata={"format": SHARED_FORMAT})  # tied weights copied, not refused
    document["files"] = {WEIGHTS_FILE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    with folder_writer(folder) as tmp:  # a failed write leaves no temporary folder and the old folder as it was
        atomic_write_bytes(tmp / WEIGHTS_FILE, data)
        atomic_write_json(tmp / SHARED_FILE, document, indent=1)
        atomic_write_bytes(tmp / CARD_FILE, model_card(document, title=name).encode("utf-8"))
    logger.info("saved a %s result (%d tensors) to %s", document["stage"], len(parameters), folder)
    return folder


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = True,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload a folder written by :func:`save_trained` to the Hugging Face Hub; returns the commit's URL.

    Needs ``huggingface_hub``, a token (``token=``, ``HF_TOKEN`` or ``huggingface-cli login``) and the network. The
    repository is created when missing (private by default). An invalid ``repo_id`` is a ConfigError before anything
    is sent; any failure of the Hub or the network is a :class:`~cir_plugins.errors.HubError` in one line.
    """
    check_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / SHARED_FILE).is_file():
        raise CheckpointError(explain("not a folder written by save_trained", got=str(folder),
                                      expected=f"{WEIGHTS_FILE} and {SHARED_FILE} in it",
                                      fix="write it with cp.save_trained(run_or_trainer, folder) first"))
    try:
        import huggingface_hub  # noqa: PLC0415 (optional)
    except ImportError as error:
        raise ConfigError(explain("push_to_hub needs the huggingface_hub package", got=str(error),
                                  fix='pip install "cir_plugins[hub]"')) from error
    if not (token := token or huggingface_hub.get_token()):
        raise ConfigError(explain("no Hugging Face token", got=None,
                                  fix="pass token=..., set HF_TOKEN, or run `huggingface-cli login`"))
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, revision=revision,
                                 commit_message=commit_message or f"cir_plugins result from {folder.name}")
    except Exception as error:  # huggingface_hub's HTTP, offline, validation and connection errors alike
        cause = (str(error).strip().splitlines() or [""])[0]
        raise HubError(explain(f"the upload of {folder} to the Hub repository {repo_id!r} failed",
                               got=f"{type(error).__name__}: {cause}" if cause else type(error).__name__,
                               fix="check the network (and that HF_HUB_OFFLINE is not set), the token's write "
                                   "access and the repository id, then push the folder again "
                                   "(cp.push_to_hub or cir-plugins share --push)")) from error
    url = str(getattr(info, "commit_url", info))
    logger.info("uploaded %s to %s", folder, url)
    return url
