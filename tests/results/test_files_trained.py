"""A shared folder's cir_plugins.json is validated against its schema before anything loads; share and
push_to_hub turn the Hub's failures and a bad repository id into one clear error, checked before writing; the
model card shows every name literally."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import cir_plugins as cp
from cir_plugins.cli import main
from cir_plugins.errors import CheckpointError, ConfigError, HubError
from cir_plugins.share import check_repo_id, model_card
from cir_plugins.trained import read_trained

TEMPERATURE = "__temperature__.log_tau"


def _model() -> torch.nn.Module:
    return torch.nn.Linear(2, 2, bias=False)


@pytest.fixture()
def shared(tmp_path):
    save_file({"weight": torch.ones(2, 2), TEMPERATURE: torch.tensor(-2.0)}, tmp_path / "w.safetensors")
    folder = cp.save_trained(tmp_path / "w.safetensors", tmp_path / "shared")
    assert torch.equal(cp.load_trained(_model(), folder).weight, torch.ones(2, 2))
    return folder


def _document(folder):
    return json.loads((folder / "cir_plugins.json").read_text())


BAD_DOCUMENTS = {
    "a list": ([1, 2], "not a JSON object"),
    "a string": ("x", "not a JSON object"),
    "files is a string": (lambda d: {**d, "files": "x"}, "'files' must record"),
    "trainable is a number": (lambda d: {**d, "trainable": 5}, "'trainable' must list"),
    "history is an object": (lambda d: {**d, "history": {"a": 1}}, "field 'history'"),
    "made_with is a list": (lambda d: {**d, "made_with": ["clip"]}, "field 'made_with'"),
    "files entry malformed": (lambda d: {**d, "files": {"weights.safetensors": {"bytes": "9"}}}, "malformed"),
    "files names a path": (lambda d: {**d, "files": {**d["files"], "../x": d["files"]["weights.safetensors"]}},
                           "directly inside the folder"),
    "format deleted": (lambda d: {k: v for k, v in d.items() if k != "format"}, "'format' is missing"),
    "files deleted": (lambda d: {k: v for k, v in d.items() if k != "files"}, "'files' must record"),
}


@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
def test_a_malformed_document_is_one_clear_error(shared, case):
    edit, message = BAD_DOCUMENTS[case]
    document = edit(_document(shared)) if callable(edit) else edit
    (shared / "cir_plugins.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=message):
        cp.load_trained(_model(), shared)


def test_deeply_nested_json_is_one_clear_error(shared):
    (shared / "cir_plugins.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        cp.load_trained(_model(), shared)


@pytest.mark.parametrize("field", ["format", "files"])
def test_deleting_a_field_does_not_skip_the_checksum(shared, field):
    data = bytearray((shared / "weights.safetensors").read_bytes())
    data[-1] ^= 0x01  # edited weights: still safetensors
    (shared / "weights.safetensors").write_bytes(bytes(data))
    document = {k: v for k, v in _document(shared).items() if k != field}
    (shared / "cir_plugins.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError):
        cp.load_trained(_model(), shared)


def test_a_weights_file_linked_from_outside_is_refused(shared, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(shared / "weights.safetensors", outside)  # same bytes: the checksum alone would pass
    (shared / "weights.safetensors").unlink()
    os.symlink(outside, shared / "weights.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file inside the folder"):
        cp.load_trained(_model(), shared)
    (shared / "cir_plugins.json").unlink()  # a bare weights folder: the same rule
    with pytest.raises(CheckpointError, match="not a regular file inside the folder"):
        cp.load_trained(_model(), shared)


@pytest.mark.parametrize("log_tau", [torch.tensor(-1e6), torch.tensor(float("nan")), torch.ones(3)])
def test_an_unusable_log_temperature_is_refused_and_share_says_why(tmp_path, log_tau, capsys):
    save_file({"weight": torch.ones(2, 2), TEMPERATURE: log_tau}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="log-temperature"):
        read_trained(tmp_path / "w.safetensors")
    code = main(["share", "--trained", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "log-temperature" in err and "math domain" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("repo_id", ["../../etc", "me/../x", "a/b/c", "-x", "me/x--y", "", "me/" + "x" * 97])
def test_a_bad_repo_id_is_refused_before_anything_is_written(tmp_path, repo_id, capsys):
    save_file({"weight": torch.ones(2, 2)}, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="repository id"):
        check_repo_id(repo_id)
    code = main(["share", "--trained", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "out"),
                 f"--push={repo_id}"])
    assert code == 2 and "repository id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert check_repo_id("me/my-model.v2") == "me/my-model.v2" and check_repo_id("model_1") == "model_1"


@pytest.mark.parametrize("failure", ["offline", "connection", "http"])
def test_hub_failures_are_one_line(shared, tmp_path, monkeypatch, capsys, failure):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import errors

    def fail(*args, **kwargs):
        if failure == "offline":
            raise errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")
        if failure == "connection":
            raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")
        raise errors.HfHubHTTPError("403 Forbidden: you have no write access\nmore details")

    class FailingApi:
        create_repo = upload_folder = staticmethod(fail)

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    with pytest.raises(HubError, match="push the folder again"):
        cp.push_to_hub(shared, "me/toy", token="hf_test")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    save_file({"weight": torch.ones(2, 2)}, tmp_path / "w2.safetensors")
    code = main(["share", "--trained", str(tmp_path / "w2.safetensors"), "--out", str(tmp_path / "out"),
                 "--push", "me/toy"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "'me/toy'" in err
    assert (tmp_path / "out" / "weights.safetensors").is_file()  # written: it can be pushed again


def test_the_model_card_shows_names_literally():
    hostile = "<script>alert(1)</script> *bold* [link](http://x) | cell\n# heading"
    document = {"stage": "stage2", "name": hostile, "base_model": "f.py:build\n```\n<img src=x>",
                "evaluation": {hostile: {"R@1<b>": 1.0}}, "config": {"lr|x": "`a` | b"},
                "bank": {"fingerprint": "ab`c", "content_fingerprint": "x", "rows": 2, "ids": 2,
                         "similarity": "dot", "shape": [4]}}
    card = model_card(document)
    code_line = next(line for line in card.splitlines() if line.startswith("model = build()"))
    assert code_line.endswith("f.py:build ``` <img src=x>")  # on one line inside the code block: shown as text
    outside = card.replace(code_line, "")
    assert "<script>" not in outside and "<img" not in outside and "<b>" not in outside and "[link](" not in outside
    assert "\n# heading" not in card and card.count("```") == 2 + 1  # the code block's fences, plus the line's
    assert "# \\<script\\>alert(1)\\</script\\> \\*bold\\* \\[link\\](http://x) \\| cell \\# heading" in card
    row = next(line for line in card.splitlines() if line.startswith("| lr"))
    assert row.count(" | ") == 1 and "\\|" in row  # the value's pipes do not make new cells
    assert "``ab`c``" in card
