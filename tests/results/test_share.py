"""save_trained / push_to_hub: a shared folder loads back and reproduces the evaluation; the card says how."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from _toy import make_model

import cir_plugins as cp
from cir_plugins.errors import CheckpointError, ConfigError

WORLD = dict(n_train_triplets=16, n_train_unlabelled=24, n_val_queries=8, n_val_distractors=8,
             n_test_queries=8, n_test_distractors=8, duplicate_rate=0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model (3x4x4 images) trained on the quick synthetic world: stage 1, a bank, stage 2."""
    root = tmp_path_factory.mktemp("share")
    cp.make_world(root / "world", size=WORLD)  # rendered at its own size, loaded at 4x4 below
    train, val, test = (cp.load_cirr(root / "world", s, size=4) for s in ("train", "val", "test"))
    model = make_model()
    common = dict(epochs=2, batch_size=8, lr=1e-2, show_progress=False)
    cp.Stage1Trainer(model, train.triplets, train.images,
                     config=cp.Stage1Config(**common, output_dir=str(root / "stage1"))).fit()
    bank = cp.NegativeBank.build(model, list(train.gallery_ids), train.images, show_progress=False)
    stage2 = cp.Stage2Trainer(model, bank, train.triplets, train.images,
                              config=cp.Stage2Config(**common, output_dir=str(root / "stage2")),
                              evaluator=cp.Evaluator.on_split(val, show_progress=False))
    stage2.fit()
    metrics = cp.evaluate(model, test, show_progress=False)
    return types.SimpleNamespace(root=root, model=model, bank=bank, trainer=stage2, test=test, metrics=metrics)


def test_saved_folder_loads_back_and_reproduces_the_evaluation(trained, tmp_path):
    folder = cp.save_trained(trained.root / "stage2", tmp_path / "shared", on_top_of=[trained.root / "stage1"],
                             bank=trained.bank, evaluation={"synthetic test (CIRR protocol)": trained.metrics},
                             base_model="_toy:make_model", name="toy CIR")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "cir_plugins.json", "weights.safetensors"]
    loaded = cp.load_trained(make_model(), folder)  # a fresh base model + the folder = the trained model
    again = cp.evaluate(loaded, trained.test, show_progress=False)
    assert {k: v for k, v in again.items() if k != "protocol"} == \
        {k: v for k, v in trained.metrics.items() if k != "protocol"}
    for (name, p), q in zip(loaded.named_parameters(), trained.model.parameters()):
        assert torch.equal(p, q), name  # stage 1 changed both towers: on_top_of brought them along

    document = json.loads((folder / "cir_plugins.json").read_text())
    assert document["format"] == "cir_plugins.trained" and document["stage"] == "stage2"
    assert document["bank"]["fingerprint"] == trained.bank.fingerprint and document["bank"]["rows"] == len(trained.bank)
    assert document["config"]["lr"] == 0.01 and document["best_epoch"] == trained.trainer.best_epoch
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: cir_plugins") and "# toy CIR" in card
    assert 'cp.load_trained(model, "path/to/this/folder")' in card and "_toy:make_model" in card
    assert f"| synthetic test (CIRR protocol) | {trained.metrics['R@1']:.2f} |" in card
    assert trained.bank.fingerprint in card and "| lr | `0.01` |" in card


def test_save_from_the_trainer_without_the_stage1_result_misses_stage1(trained, tmp_path):
    folder = cp.save_trained(trained.trainer, tmp_path / "from-trainer")
    document = json.loads((folder / "cir_plugins.json").read_text())
    assert document["bank"]["fingerprint"] == trained.bank.fingerprint  # the trainer's own bank
    assert "validation during training" in (folder / "README.md").read_text()  # the history's selected epoch
    loaded = dict(cp.load_trained(make_model(), folder).named_parameters())
    fresh, now = dict(make_model().named_parameters()), dict(trained.model.named_parameters())
    saved = set(document["trainable"])
    assert saved == {"text.weight", "fuse.weight", "fuse.bias"}  # stage 2's query side only
    for name in loaded:
        assert torch.equal(loaded[name], now[name] if name in saved else fresh[name]), name
    assert not torch.equal(fresh["image_proj.weight"], now["image_proj.weight"])  # stage 1's change is not in it


def test_a_corrupt_shared_folder_is_refused(trained, tmp_path):
    folder = cp.save_trained(trained.root / "stage2", tmp_path / "shared")
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in a value: still readable safetensors, another SHA-256
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 recorded in cir_plugins.json"):
        cp.load_trained(make_model(), folder)


def test_existing_folder_is_not_replaced_unless_asked(trained, tmp_path):
    folder = cp.save_trained(trained.root / "stage2", tmp_path / "f")
    with pytest.raises(ConfigError, match="overwrite=True"):
        cp.save_trained(trained.root / "stage2", folder)
    cp.save_trained(trained.root / "stage2", folder, overwrite=True, name="second")
    assert "# second" in (folder / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_push_to_hub_uploads_the_folder_with_a_stubbed_client(trained, tmp_path, monkeypatch):
    """The upload call itself is stubbed (no network in tests): this checks what push_to_hub asks the
    huggingface_hub client to do, not the Hub."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub

    folder = cp.save_trained(trained.root / "stage2", tmp_path / "shared")
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return types.SimpleNamespace(commit_url=f"https://hub.example/{kwargs['repo_id']}/commit/1")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = cp.push_to_hub(folder, "me/toy-cir", token="hf_test")
    assert url == "https://hub.example/me/toy-cir/commit/1"
    assert calls[0] == ("create_repo", "me/toy-cir", {"token": "hf_test", "private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(folder) and calls[1][1]["repo_id"] == "me/toy-cir"

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        cp.push_to_hub(folder, "me/toy-cir")
    with pytest.raises(CheckpointError, match="save_trained"):
        cp.push_to_hub(tmp_path, "me/toy-cir", token="hf_test")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ConfigError, match=r"cir_plugins\[hub\]"):
        cp.push_to_hub(folder, "me/toy-cir", token="hf_test")
