"""examples/clip4cir/run_spn.py follows the paper's CLIP4Cir recipe: on FashionIQ the partners are ranked over the
three categories' training images together, only annotated references get partners, the text is "{T}", each image
is captioned with its own category in the prompt, and the run goes through the library's reproduce()."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
for path in (str(ROOT / "examples"), str(ROOT / "examples" / "clip4cir")):
    if path not in sys.path:
        sys.path.insert(0, path)

import _tiny_clip  # noqa: E402
import run_spn  # noqa: E402

from cir_plugins.data.fixtures import build_fashioniq_tree  # noqa: E402
from cir_plugins.positives.captioners import HFCaptioner  # noqa: E402

CATEGORIES = ("dress", "shirt", "toptee")


@pytest.fixture(scope="module")
def fiq(tmp_path_factory):
    base = tmp_path_factory.mktemp("spn_fiq")
    root = build_fashioniq_tree(base / "fiq", n_images=8, n_triplets=5, splits=("train", "val"))
    captions = {}
    for category in CATEGORIES:
        for name in json.loads((root / "image_splits" / f"split.{category}.train.json").read_text()):
            captions[name] = f"a {category} with pattern {len(captions)}"
    (base / "captions.json").write_text(json.dumps(captions))
    clip = _tiny_clip.save_tiny_clip(base / "clip", _tiny_clip.words_of(list(captions.values()) + ["is red"]), seed=0,
                                     image_size=24, patch_size=8, width=32, projection_dim=16)
    return root, base / "captions.json", clip


def _category(name: str) -> str:
    return next(c for c in CATEGORIES if name.startswith(f"B0{c}_"))


def test_fashioniq_generation_ranks_over_the_three_categories_refer_only(fiq, tmp_path, capsys):
    root, captions, clip = fiq
    argv = ["--dataset", "fashioniq", "--root", str(root), "--stage1", str(clip), "--captioner", f"file:{captions}",
            "--out", str(tmp_path / "spn"), "--rank-window", "0.2,0.45", "--epochs", "1", "--batch-size", "4",
            "--steps-per-epoch", "1", "--batch-size-eval", "16", "--device", "cpu", "--no-progress"]
    assert run_spn.main(argv) == 0
    generated = json.loads((tmp_path / "spn" / "train" / "generated.json").read_text())
    references = {r["candidate"] for c in CATEGORIES
                  for r in json.loads((root / "captions" / f"cap.{c}.train.json").read_text())}
    assert generated and all(r["candidate"] in references for r in generated)  # refer-only
    assert any(_category(r["candidate"]) != _category(r["target"]) for r in generated)  # one pool of 24 images
    assert all(r["texts"] == [r["target_caption"]] for r in generated)  # the "{T}" template
    results = json.loads((tmp_path / "spn" / "train" / "results.json").read_text())
    assert results["bank_shape"][0] == 24 and results["recipe"]["name"] == "clip4cir-fashioniq"
    assert results["after"]["protocol"]["categories"] == list(CATEGORIES)
    assert results["after"]["protocol"]["reference_removed"] is True  # as the release evaluated its CLIP4Cir rows
    assert (tmp_path / "spn" / "combiner.safetensors").is_file() or (tmp_path / "spn" / "config.json").is_file()
    assert "44.48" in capsys.readouterr().out  # the published row printed beside the measured one


def test_the_fashion_prompt_names_each_images_own_category(fiq):
    from cir_plugins.recipes.run import load_training_data

    root, _, _ = fiq
    categories = load_training_data("fashioniq", root, transform=None).categories
    kwargs = run_spn.captioner_kwargs(run_spn.recipe_for("fashioniq"), categories)
    captioner = SimpleNamespace(prompt_template=kwargs["prompt"], category=kwargs["category"], k=kwargs["k"])
    assert HFCaptioner.prompt_for(captioner, "B0shirt_train03") == "please briefly describe the shirt in 4 words"
    assert HFCaptioner.prompt_for(captioner, "B0dress_train00") == "please briefly describe the dress in 4 words"
    cirr = run_spn.captioner_kwargs(run_spn.recipe_for("cirr"), None)
    assert HFCaptioner.prompt_for(SimpleNamespace(prompt_template=cirr["prompt"], category=None, k=cirr["k"]), "x") \
        == "please briefly describe the image in 8 words"
