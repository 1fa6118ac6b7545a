"""``cir-plugins share``: a run folder (with the stage-1 run under it, the bank and an evaluation file) becomes
a folder that load_trained reads back to the trained model; --push goes through huggingface_hub (stubbed)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from _toy import make_model, make_world

import cir_plugins as cp
from cir_plugins.cli import main
from cir_plugins.errors import DataError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    images, train, _ = make_world()
    model = make_model()
    common = dict(epochs=1, batch_size=16, lr=1e-2, show_progress=False)
    cp.Stage1Trainer(model, train, images, config=cp.Stage1Config(**common, output_dir=str(root / "stage1"))).fit()
    bank = cp.NegativeBank.build(model, list(images), images, show_progress=False)
    bank.save(root / "bank.safetensors")
    cp.Stage2Trainer(model, bank, train, images,
                     config=cp.Stage2Config(**common, output_dir=str(root / "stage2"))).fit()
    (root / "val.json").write_text(json.dumps({"R@1": 12.5, "R@5": 40.0, "n_queries": 40}))
    return root, model, bank


def test_share_command_writes_a_folder_that_loads_back(runs, tmp_path, capsys):
    root, model, bank = runs
    out = tmp_path / "shared"
    assert main(["share", "--trained", str(root / "stage2"), "--on-top-of", str(root / "stage1"),
                 "--bank", str(root / "bank.safetensors"), "--evaluation", f"toy val={root / 'val.json'}",
                 "--base-model", "_toy:make_model", "--out", str(out)]) == 0
    assert "load it with --trained" in capsys.readouterr().out
    loaded = cp.load_trained(make_model(), out)
    for (name, p), q in zip(loaded.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    document = json.loads((out / "cir_plugins.json").read_text())
    assert document["evaluation"] == {"toy val": {"R@1": 12.5, "R@5": 40.0, "n_queries": 40.0}}
    assert document["bank"]["fingerprint"] == bank.fingerprint
    assert "| toy val | 12.50 | 40.00 | 40.00 |" in (out / "README.md").read_text()
    assert main(["share", "--trained", str(root / "stage2"), "--out", str(out)]) == 2  # exists: a clear error
    assert "pass --overwrite to replace it" in capsys.readouterr().err


def test_share_push_and_a_bad_evaluation_file(runs, tmp_path, monkeypatch, capsys):
    """The upload itself is stubbed (tests are offline): this checks the command hands the folder to
    huggingface_hub as a private repository."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    root, _, _ = runs
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            uploads.append(("create", repo_id, kwargs["private"]))

        def upload_folder(self, **kwargs):
            uploads.append(("upload", kwargs["repo_id"], kwargs["folder_path"]))
            return types.SimpleNamespace(commit_url="https://hub.example/c/1")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    out = tmp_path / "pushed"
    assert main(["share", "--trained", str(root / "stage2"), "--out", str(out), "--push", "me/toy"]) == 0
    assert uploads == [("create", "me/toy", True), ("upload", "me/toy", str(out))]
    assert "https://hub.example/c/1" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[1, 2]")
    from cir_plugins.cli.share import _evaluation

    with pytest.raises(DataError, match="JSON object"):
        _evaluation([str(tmp_path / "bad.json")])
