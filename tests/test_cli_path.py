"""The whole command-line path a new user takes, on a tiny synthetic world and a tiny model factory:
world -> augment (default window) -> build-bank -> stage1 -> stage2 -> evaluate -> submit, each trained
result carried to the next step by ``--trained`` alone (no hand-written loader)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import cir_plugins as cp
from cir_plugins.cli import main

HERE = Path(__file__).resolve().parent
# a factory module in the working directory, named in the pkg.module:function form
FACTORY = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from test_training_toy import make_model


def build(seed=0):
    return make_model(seed=seed)
"""
WORLD = json.dumps(dict(n_train_triplets=16, n_train_unlabelled=24, n_val_queries=8, n_val_distractors=8,
                        n_test_queries=8, n_test_distractors=8, duplicate_rate=0.0))


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_cir.py").write_text(FACTORY)
    return tmp_path


def test_world_to_leaderboard_file(workdir, capsys, caplog):
    caplog.set_level("INFO")
    model = ["--model", "tiny_cir:build"]
    data = ["--dataset", "synthetic", "--root", "world", "--image-size", "4", "--no-progress"]
    assert main(["world", "--root", "world", "--quick", "--config", WORLD]) == 0
    assert main(["augment", *data, "--captioner", "synthetic", "--pair-encoder", "tiny_cir:build",
                 "--out", "generated.json"]) == 0
    generated = json.loads(Path("generated.json").read_text())
    assert len(generated) > 0
    assert main(["stage1", *model, *data, "--generated", "generated.json", "--out", "stage1", "--epochs", "1",
                 "--batch-size", "8", "--lr", "0.01", "--val-split", "val"]) == 0
    assert main(["build-bank", *model, "--trained", "stage1", *data, "--out", "bank.safetensors"]) == 0
    assert main(["stage2", *model, "--trained", "stage1", *data, "--bank", "bank.safetensors",
                 "--generated", "generated.json", "--out", "stage2", "--epochs", "1", "--batch-size", "8",
                 "--lr", "0.01", "--val-split", "val"]) == 0
    trained = ["--trained", "stage1", "--trained", "stage2"]
    assert main(["evaluate", *model, *trained, *data, "--split", "test", "--output", "test.json"]) == 0
    assert main(["submit", *model, *trained, *data, "--split", "test", "--out-dir", "submission"]) == 0
    out = capsys.readouterr().out
    assert "Rmean" in out and "wrote stage2" in out
    # quiet, rounded logs: no float printed to 15 digits, no protocol description per epoch
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "stage2 epoch 1/1: " in logged and "protocol" not in logged
    assert not re.search(r"\d\.\d{5,}", logged + out), re.search(r".*\d\.\d{5,}.*", logged + out).group(0)
    assert "n_queries 8" in out and "n_queries 8.00" not in out

    # the files are those of the trained model: the library on the same weights writes the same ranking,
    # and the untrained model another one (so --trained did put the weights on)
    split = cp.load_cirr("world", "test", size=4)
    trained_model = cp.load_trained(cp.load_trained(_factory()(), "stage1"), "stage2")
    assert json.loads(Path("test.json").read_text())["Rmean"] == \
        pytest.approx(cp.evaluate(trained_model, split, show_progress=False)["Rmean"])
    for name, weights in (("trained", trained_model), ("untrained", _factory()())):
        cp.submit_cirr(weights, split, name, show_progress=False)
    written = Path("submission/recall_submission_cirr.json").read_text()
    assert written == Path("trained/recall_submission_cirr.json").read_text()
    assert written != Path("untrained/recall_submission_cirr.json").read_text()
    assert len(json.loads(written)) == 2 + len(split.triplets)  # version, metric and one ranking per pair


def _factory():
    from cir_plugins._loading import load_factory

    return load_factory("tiny_cir:build")
