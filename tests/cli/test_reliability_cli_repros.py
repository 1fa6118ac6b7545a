"""The command-line reproductions of issue 18 (items 1 and 5), end to end: build-bank on a tree holding a
thin-image memory bomb stops with the library's error naming the image (and --skip-unreadable drops it), and
a shard cache of another --image-size, --transform or --dtype is not reused."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

import cir_plugins as cp
from cir_plugins.cli import main
from cir_plugins.data.fixtures import build_cirr_tree

HERE = Path(__file__).resolve().parent


def _tree(tmp_path, split="val", model="test_reliability_bank_content:PooledToy"):
    """A tiny CIRR tree and the command-line flags that name it and a test model (module:class in tests/)."""
    root = build_cirr_tree(tmp_path / "cirr", n_images=12, n_triplets=6, splits=(split,))
    module, name = model.split(":")
    factory = tmp_path / "factory.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(HERE)!r})\n"
                       f"from {module} import {name}\n"
                       f"def build():\n    return {name}()\n")
    common = ["--model", f"{factory}:build", "--dataset", "cirr", "--root", str(root), "--split", split,
              "--no-progress"]
    return root, common


def test_build_bank_on_a_tree_holding_a_thin_image_names_it_and_can_skip_it(tmp_path, capsys):
    root, common = _tree(tmp_path)
    split = cp.load_cirr(root, "val")
    bomb = split.gallery_ids[3]
    Image.new("RGB", (1_000_000, 1)).save(split.images.path_of(bomb), format="PNG")  # 256M pixels after the resize
    assert main(["build-bank", *common, "--image-size", "16", "--out", str(tmp_path / "b.safetensors")]) == 2
    err = capsys.readouterr().err
    assert bomb in err and "pixel limit" in err and "Traceback" not in err
    assert main(["build-bank", *common, "--image-size", "16", "--skip-unreadable",
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    bank = cp.NegativeBank.load(tmp_path / "b.safetensors")
    assert bomb not in bank.ids and len(bank.ids) == len(split.gallery_ids) - 1


def test_build_bank_with_one_cache_and_another_image_size_transform_or_dtype_rebuilds(tmp_path, caplog):
    root, common = _tree(tmp_path)
    cache = ["--cache-dir", str(tmp_path / "cache"), "--no-dedup"]

    def build(out, *extra, cached=True):
        with caplog.at_level(logging.INFO, logger="cir_plugins.negatives.bank"):
            caplog.clear()
            assert main(["build-bank", *common, *(cache if cached else ["--no-dedup"]), *extra,
                         "--out", str(tmp_path / out)]) == 0
            return cp.NegativeBank.load(tmp_path / out), caplog.text

    build("a.safetensors", "--image-size", "16")
    _, log = build("a.safetensors", "--image-size", "16")
    assert "(12 re-used from the shard cache)" in log  # the same settings reuse every row
    for extra in (["--image-size", "32"], ["--image-size", "16", "--transform", "squarepad"],
                  ["--image-size", "16", "--dtype", "bfloat16"]):
        bank, log = build("b.safetensors", *extra)
        assert "(0 re-used from the shard cache)" in log, extra
        fresh, _ = build("c.safetensors", *extra, cached=False)
        assert bank.dtype == fresh.dtype and torch.equal(bank.embeddings, fresh.embeddings), extra


def test_stage2_resume_on_other_triplets_is_refused_unless_allow_data_change(tmp_path, capsys):
    _, common = _tree(tmp_path, "train", "_toy:make_model")
    common = [*common, "--image-size", "4"]
    bank = tmp_path / "bank.safetensors"
    assert main(["build-bank", *common, "--out", str(bank)]) == 0
    ids = cp.NegativeBank.load(bank).ids
    generated = tmp_path / "generated.json"
    generated.write_text(f'[{{"reference": "{ids[0]}", "texts": ["red"], "target": "{ids[3]}"}}]')
    args = ["stage2", *common, "--bank", str(bank), "--out", str(tmp_path / "run"), "--batch-size", "4",
            "--lr", "0.01"]
    assert main([*args, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--resume", "--generated", str(generated)]) == 2
    err = capsys.readouterr().err
    assert "triplets differ" in err and "--resume --allow-data-change" in err
    assert main([*args, "--epochs", "2", "--resume", "--generated", str(generated), "--allow-data-change"]) == 0
