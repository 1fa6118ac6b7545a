"""`cir-plugins augment --dataset fashioniq --recipe clip4cir-fashioniq` follows the paper's FashionIQ generation:
the three categories' training images are one pool for partner ranking (the images the annotated triplets name, as
the release and `recipe run` rank), only annotated references get partners,
the text is "{T}", and the settings (window as a share of N, refer-only, word budget) come from the recipe.
Without --recipe the defaults are the recommended recipe (nearest 1%, every image, the dataset's templates)."""

from __future__ import annotations

import json
from pathlib import Path

from cir_plugins.cli import run_command
from cir_plugins.cli.augment import DEFAULT_RANK_WINDOWS, RECIPE_DEFAULTS, RECOMMENDED, RELEASE_RANK_WINDOWS
from cir_plugins.data.fixtures import build_fashioniq_tree
from cir_plugins.recipes import default_recipe

CATEGORIES = ("dress", "shirt", "toptee")
ENCODER = "import torch\ndef build():\n    return lambda images: images.flatten(1)[:, :24]\n"


def _category(name: str) -> str:
    return next(c for c in CATEGORIES if name.startswith(f"B0{c}_"))


def test_fashioniq_augment_pools_the_three_categories_refer_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = build_fashioniq_tree(tmp_path / "fiq", n_images=8, n_triplets=5, splits=("train",))
    names = [n for c in CATEGORIES for n in json.loads((root / "image_splits" / f"split.{c}.train.json").read_text())]
    Path("captions.json").write_text(json.dumps({n: f"a {_category(n)} numbered {k}" for k, n in enumerate(names)}))
    Path("enc.py").write_text(ENCODER)
    assert run_command("augment", ["--dataset", "fashioniq", "--root", str(root), "--captioner", "file:captions.json",
                                   "--pair-encoder", "enc:build", "--image-size", "4", "--out", "gen.json",
                                   "--recipe", "clip4cir-fashioniq", "--no-progress"]) == 0
    generated = json.loads(Path("gen.json").read_text())
    records = [r for c in CATEGORIES for r in json.loads((root / "captions" / f"cap.{c}.train.json").read_text())]
    references = {r["candidate"] for r in records}
    named = {i for r in records for i in (r["candidate"], r["target"])}  # the recipe's pool, as reproduce's
    assert generated and all(r["candidate"] in references for r in generated)  # refer-only in the recipe
    assert all(r["target"] in named for r in generated)  # partners ranked among the named images only
    assert any(_category(r["candidate"]) != _category(r["target"]) for r in generated)  # one pool, 3 categories
    assert all(r["texts"] == [r["target_caption"]] for r in generated)  # "{T}"
    summary = json.loads(Path("gen.json.summary.json").read_text())
    assert len(named) < 24 and summary["images"] == len(named) and summary["categories"] == list(CATEGORIES)
    assert summary["pool"] == {"kind": "triplets", "images": len(named)}
    assert summary["refer_only"] is True and summary["words"] == 4 and summary["recipe"] == "clip4cir-fashioniq"
    assert summary["rank_window"] == RELEASE_RANK_WINDOWS["fashioniq"] and summary["keep_equal_captions"] is True
    # --category keeps one category's images only; --no-refer gives every image a partner
    assert run_command("augment", ["--dataset", "fashioniq", "--category", "shirt", "--no-refer", "--root", str(root),
                                   "--captioner", "file:captions.json", "--pair-encoder", "enc:build",
                                   "--recipe", "clip4cir-fashioniq", "--image-size", "4", "--out", "shirt.json",
                                   "--no-progress"]) == 0
    shirt = json.loads(Path("shirt.json.summary.json").read_text())
    shirt_named = {i for r in json.loads((root / "captions" / "cap.shirt.train.json").read_text())
                   for i in (r["candidate"], r["target"])}
    assert shirt["images"] == len(shirt_named) and shirt["refer_only"] is False and shirt["queries"] == len(shirt_named)
    # without --recipe: the recommended recipe, every image of the pool gets a partner from its nearest 1%
    assert run_command("augment", ["--dataset", "fashioniq", "--root", str(root), "--captioner", "file:captions.json",
                                   "--pair-encoder", "enc:build", "--image-size", "4", "--out", "ours.json",
                                   "--no-progress"]) == 0
    ours = json.loads(Path("ours.json.summary.json").read_text())
    assert ours["recipe"] == "ours, no rewrite" and ours["rank_window"] == "0.0,0.01" and ours["refer_only"] is False
    assert ours["queries"] == 24 and ours["pairs"] == 24 and ours["keep_equal_captions"] is False
    assert ours["pool"] == {"kind": "all", "images": 24}
    assert all(r["texts"] == [r["target_caption"]] for r in json.loads(Path("ours.json").read_text()))


def test_augment_defaults_are_the_recommended_recipe_and_recipes_give_the_release():
    for dataset in ("cirr", "fashioniq"):
        generation = default_recipe(dataset).generation
        low, high = generation.window_fractions(dataset)
        assert RECIPE_DEFAULTS[dataset] == {"rank_window": f"{low},{high}", "refer": generation.refer_only,
                                            "words": generation.words}
        assert RELEASE_RANK_WINDOWS[dataset] == f"{low},{high}"
        assert DEFAULT_RANK_WINDOWS[dataset] == RECOMMENDED["rank_window"] == "0.0,0.01"
    assert RELEASE_RANK_WINDOWS["cirr"] == "0.5904,0.8855"
    assert RECOMMENDED["refer"] is False and RECOMMENDED["partners"] == 1 and RECOMMENDED["long_text"] == "target"
