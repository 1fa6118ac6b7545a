"""The build-bank and stage2 subcommands on a tiny CIRR tree, end to end in-process."""

from __future__ import annotations

import json

import pytest
from _toy import factory_source

from cir_plugins.data.fixtures import build_cirr_tree
from cir_plugins.errors import BankMismatchError
from cir_plugins.negatives.bank import NegativeBank


def main(argv):
    """The two subcommands as cli.main dispatches them (configure + run), without importing the
    other subcommands' modules."""
    import argparse
    import importlib

    name, rest = argv[0], argv[1:]
    module = importlib.import_module({"build-bank": "cir_plugins.cli.build_bank",
                                      "stage2": "cir_plugins.cli.stage2"}[name])
    parser = argparse.ArgumentParser(prog=f"cir-plugins {name}")
    module.configure(parser)
    return module.run(parser.parse_args(rest))


@pytest.fixture()
def tree(tmp_path):
    root = build_cirr_tree(tmp_path / "cirr", n_images=12, n_triplets=6, splits=("train", "val"))
    factory = tmp_path / "factory.py"
    factory.write_text(factory_source())
    return root, factory


def test_build_bank_then_stage2_then_resume(tree, tmp_path, capsys):
    root, factory = tree
    common = ["--model", f"{factory}:build", "--dataset", "cirr", "--root", str(root), "--split", "train",
              "--image-size", "4", "--no-progress"]
    bank_path = tmp_path / "bank.safetensors"
    assert main(["build-bank", *common, "--out", str(bank_path), "--dedup"]) == 0
    bank = NegativeBank.load(bank_path)
    assert len(bank.ids) == 12 and bank.embeddings.shape[1] == 16
    generated = tmp_path / "generated.json"
    generated.write_text(json.dumps([{"reference": bank.ids[0], "texts": ["red", "make it red"],
                                      "target": bank.ids[3]}]))
    out = tmp_path / "run"
    args = ["stage2", *common, "--bank", str(bank_path), "--generated", str(generated), "--out", str(out),
            "--batch-size", "4", "--lr", "0.01"]
    assert main([*args, "--epochs", "1"]) == 0
    assert (out / "checkpoints" / "last" / "weights.safetensors").is_file()
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    # with a validation split, cir_plugins.evaluate runs per epoch and 'best' follows Rmean
    val_out = tmp_path / "run-val"
    args = [a if a != str(out) else str(val_out) for a in args]
    assert main([*args, "--epochs", "2", "--val-split", "val"]) == 0
    history = json.loads((val_out / "history.json").read_text())
    assert all("Rmean" in h["metrics"] and 0 <= h["metrics"]["Rmean"] <= 100 for h in history)
    assert (val_out / "checkpoints" / "best" / "state.json").is_file()
    assert "epoch 2: loss" in capsys.readouterr().out


def test_stage2_refuses_bank_of_other_model(tree, tmp_path, capsys):
    root, factory = tree
    common = ["--dataset", "cirr", "--root", str(root), "--split", "train", "--image-size", "4", "--no-progress"]
    bank_path = tmp_path / "bank.safetensors"
    assert main(["build-bank", "--model", f"{factory}:build", *common, "--out", str(bank_path)]) == 0
    with pytest.raises(BankMismatchError, match="fingerprint"):
        main(["stage2", "--model", f"{factory}:build", "--factory-kwargs", '{"seed": 7}', *common,
              "--bank", str(bank_path), "--out", str(tmp_path / "run")])


def test_read_triplets_accepts_what_augment_writes(tmp_path):
    """`stage2 --generated` reads the augmenter's CIRR and FashionIQ files as well as the plain list."""
    from cir_plugins.data.triplet import Triplet
    from cir_plugins.positives.annotations import read_generated, write_generated_cirr, write_generated_fashioniq

    generated = [Triplet("a", ("b instead of a", "Unlike a, I want b"), "b", source="generated"),
                 Triplet("c", ("d",), "d", source="generated")]
    for writer in (write_generated_cirr, write_generated_fashioniq):
        path = writer(generated, tmp_path / f"{writer.__name__}.json")
        back = read_generated(path)
        assert [(t.reference, t.texts, t.target, t.source) for t in back] == \
            [(t.reference, t.texts, t.target, t.source) for t in generated]
