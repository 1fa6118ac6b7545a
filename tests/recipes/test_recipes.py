"""The paper's recipes as data (cir_plugins/recipes/*.json), the `recipe` command, and every recipe run end to
end on tiny fixtures in the exact CIRR / FashionIQ layouts with a tiny model: generate, bank, stage 2, evaluate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _toy import factory_source

from cir_plugins.cli import run_command
from cir_plugins.data.fixtures import build_cirr_tree, build_fashioniq_tree
from cir_plugins.errors import ConfigError
from cir_plugins.recipes import (
    DATASETS,
    MODELS,
    RELEASE_VALUES,
    default_recipe,
    list_recipes,
    load_recipe,
    release_pool_images,
)

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples"
for _path in (str(EXAMPLES), str(EXAMPLES / "clip4cir")):  # the example's tiny CLIP and checkpoint factory
    if _path not in sys.path:
        sys.path.insert(0, _path)
INSTEAD, UNLIKE, TARGET = "{target} instead of {reference}", "Unlike {reference}, I want {target}", "{target}"


def test_one_recipe_per_model_and_dataset():
    assert list_recipes() == sorted(f"{m}-{d}" for m in MODELS for d in DATASETS)
    for name in list_recipes():
        recipe = load_recipe(name)
        assert (recipe.model, recipe.dataset) == tuple(name.split("-"))
        recipe.stage2_config()  # a valid Stage2Config


def test_recipes_hold_the_method_tables():
    """Spot checks against docs/method.md sections 2, 3, 5 and 7."""
    c = load_recipe("clip4cir-fashioniq")
    assert c.generation.rank_window == (10000, 20000) and c.generation.refer_only and c.generation.words == 4
    assert c.generation.templates == (TARGET,) and "{category}" in c.generation.prompt
    assert c.evaluation["remove_reference"] is True  # the release removes it for its CLIP4Cir rows
    assert c.published["after"] == {"Avg R@10": 44.48, "Avg R@50": 66.88}
    cirr = load_recipe("clip4cir-cirr")
    assert cirr.generation.rank_window == (10000, 15000) and not cirr.generation.refer_only
    assert cirr.generation.templates == (INSTEAD, UNLIKE) and cirr.generation.words == 8
    assert cirr.published["before"]["Rmean"] == 72.94 and cirr.published["after"]["R@1"] == 45.33
    config = cirr.stage2_config()
    assert (config.batch_size, config.epochs, config.lr, config.temperature, config.learn_temperature) == \
        (256, 3, 2e-5, 0.02, False)
    assert (config.betas, config.eps, config.weight_decay) == ((0.9, 0.999), 1e-7, 0.01)
    sprc = load_recipe("sprc-fashioniq")
    s = sprc.stage2_config()
    assert (s.batch_size, s.epochs, s.lr, s.temperature, s.learn_temperature, s.betas, s.weight_decay) == \
        (32, 3, 1e-5, 0.05, True, (0.9, 0.98), 0.05)
    assert sprc.generation.rank_window is None and sprc.generation.max_triplets == 6000 and sprc.generation.refer_only
    assert sprc.evaluation["remove_reference"] is False  # kept for SPRC
    assert load_recipe("blip4cir-fashioniq").generation.max_triplets == 3000
    assert not load_recipe("blip4cir-cirr").generation.refer_only and load_recipe("sprc-cirr").generation.refer_only
    assert load_recipe("tgcir-cirr").stage2_config().temperature == 0.01
    assert load_recipe("tgcir-fashioniq").published["before"] == {"Avg R@10": 39.81, "Avg R@50": 63.06}
    z = load_recipe("zeroshot-fashioniq")
    assert not z.generation.annotated and z.generation.words == 5 and z.stage1_config().temperature == 0.01
    assert z.stage2_config().temperature == 0.02 and z.published is None


def test_release_values_and_window_fractions():
    recipe = load_recipe("clip4cir-cirr")
    assert recipe.stage2["mask_reference"] is True and recipe.bank["images"] == "all"
    release = recipe.as_release()
    for (section, key), value in RELEASE_VALUES.items():
        assert getattr(release, section)[key] == value
    assert release.stage2_config().mask_reference is False
    assert recipe.stage2["mask_reference"] is True  # the original is untouched
    # the release ranks among the images its annotated train triplets name: 25,136 on FashionIQ (the three
    # categories list 46,609 names, 45,429 distinct); CIRR's 16,939 training images bound its pool
    assert release_pool_images("fashioniq") == 25136 and release_pool_images("fashioniq", "all") == 45429
    assert release_pool_images("cirr") == 16939
    assert default_recipe("cirr").generation.window_fractions("cirr") == (round(10000 / 16939, 4),
                                                                         round(15000 / 16939, 4))
    assert load_recipe("clip4cir-fashioniq").generation.window_fractions("fashioniq") == (0.3978, 0.7957)
    assert default_recipe("synthetic") is None


def test_on_synthetic_keeps_the_settings_with_a_window_over_n():
    cirr = load_recipe("sprc-cirr")
    world = cirr.on_synthetic((0.1, 0.5))
    assert (world.name, world.dataset, world.published) == ("sprc-synthetic", "synthetic", None)
    assert world.generation.rank_window == (0.1, 0.5) and world.stage2 == cirr.stage2
    assert world.generation.templates == cirr.generation.templates
    with pytest.raises(ConfigError, match="CIRR"):
        load_recipe("sprc-fashioniq").on_synthetic((0.1, 0.5))


def test_a_bad_recipe_names_the_file_and_the_key(tmp_path):
    data = load_recipe("clip4cir-cirr").to_dict()
    cases = [("extra", lambda d: d.update(colour="red"), "unknown keys"),
             ("window", lambda d: d["generation"].update(rank_window=[5, 2]), "rank_window"),
             # a setting of the run, not the recipe: refused, as to_dict() could not write it back
             ("runkey", lambda d: d["generation"].update(near_duplicate_threshold=0.9), "generation has unknown keys"),
             ("lr", lambda d: d["stage2"].update(lr=-1), "stage2"),
             ("stage2key", lambda d: d["stage2"].update(momentum=0.9), "stage2"),
             ("keep", lambda d: d["evaluation"].update(remove_reference=False), "always removes"),
             ("number", lambda d: d["published"]["after"].update({"R@1": 120}), "percentage")]
    for name, change, message in cases:
        broken = json.loads(json.dumps(data))
        broken["name"] = name
        change(broken)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=message) as error:
            load_recipe(str(path))
        assert f"{name}.json" in str(error.value)
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("clip4cir-coco")


def test_recipe_list_and_show(capsys):
    assert run_command("recipe", ["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_recipes()) and "76.00" in out
    assert all(f"cir-plugins recipe run {name} --model" in out for name in list_recipes())  # each one's command
    assert run_command("recipe", ["show", "tgcir-cirr"]) == 0
    assert json.loads(capsys.readouterr().out) == load_recipe("tgcir-cirr").to_dict()


# ------------------------------------------------------------------------------------------------
# every recipe, end to end on tiny fixtures


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("recipes")
    cirr = build_cirr_tree(base / "cirr", n_images=12, n_triplets=5, splits=("train", "val"))
    fiq = build_fashioniq_tree(base / "fiq", n_images=8, n_triplets=5, splits=("train", "val"))
    factory = base / "factory.py"
    factory.write_text(factory_source())
    captions = {}
    for name in json.loads((cirr / "cirr" / "image_splits" / "split.rc2.train.json").read_text()):
        captions[name] = f"a photo number {len(captions)} of a thing"
    for category in ("dress", "shirt", "toptee"):
        for name in json.loads((fiq / "image_splits" / f"split.{category}.train.json").read_text()):
            captions[name] = f"a {category} with pattern {len(captions)}"
    (base / "captions.json").write_text(json.dumps(captions))
    return {"cirr": cirr, "fashioniq": fiq, "factory": factory, "captions": base / "captions.json"}




@pytest.mark.parametrize("name", sorted(f"{m}-{d}" for m in MODELS for d in DATASETS))
def test_every_recipe_runs_end_to_end_on_tiny_fixtures(trees, tmp_path, capsys, name):
    recipe = load_recipe(name)
    argv = ["run", name, "--model", f"{trees['factory']}:build", "--root", str(trees[recipe.dataset]),
            "--out", str(tmp_path / "run"), "--captioner", f"file:{trees['captions']}", "--transform", "clip",
            "--image-size", "4", "--rank-window", "fractions", "--epochs", "1", "--batch-size", "4",
            "--steps-per-epoch", "2", "--eval-batch-size", "16", "--no-progress"]
    if recipe.stage1_training is not None:
        argv += ["--stage1-epochs", "1"]
    assert run_command("recipe", argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # generate: triplets made by the augmenter with the recipe's templates, written in the dataset's schema
    assert results["triplets"]["generated"] > 0
    assert results["triplets"]["annotated"] == (0 if name.startswith("zeroshot") else
                                                (5 if recipe.dataset == "cirr" else 15))
    assert results["augment"]["pairs"] >= results["triplets"]["generated"]
    generated = json.loads((tmp_path / "run" / "generated.json").read_text())
    key = "captions" if recipe.dataset == "fashioniq" else "caption"
    assert len(generated) == results["triplets"]["generated"]
    if recipe.generation.templates == (TARGET,):
        assert all(r["texts" if recipe.dataset == "fashioniq" else "captions"] == [r["target_caption"]]
                   for r in generated), key
    # bank: every training image once (FashionIQ: the three categories' 24), saved beside the results
    assert results["bank_shape"][0] == (12 if recipe.dataset == "cirr" else 24)
    assert (tmp_path / "run" / "bank.safetensors").is_file()
    # stage 2 with the recipe's optimiser settings, one epoch selected on the validation Rmean
    assert len(results["history"]) == 1 and "Rmean" in results["history"][0]["metrics"]
    assert results["recipe"]["stage2"] == recipe.to_dict()["stage2"]
    if recipe.stage1_training is not None:
        assert len(results["stage1_history"]) == 1
    # evaluate with the recipe's protocol, printed beside the published numbers
    protocol = results["after"]["protocol"]
    assert protocol["name"] == recipe.dataset and protocol["reference_removed"] == recipe.evaluation["remove_reference"]
    if recipe.dataset == "fashioniq":
        assert protocol["categories"] == ["dress", "shirt", "toptee"]
    for metric, p_before, p_after, _m_before, m_after in results["rows"]:
        assert m_after == pytest.approx(results["after"][metric])
        if recipe.published is not None and metric in recipe.published["after"]:
            assert (p_before, p_after) == (recipe.published["before"][metric], recipe.published["after"][metric])
            assert f"{p_after:.2f}" in printed
    assert name in printed and "measured" in printed


def _release_cirr_file(path, train_ids):
    path.write_text(
        json.dumps(
            [
                {
                    "target_hard": train_ids[k + 1],
                    "reference": train_ids[k],
                    "caption": [f"thing {k + 1} instead of thing {k}", f"Unlike thing {k}, I want {k + 1}"],
                    "pairid": 0,
                    "img_set": {"members": ["xxx"]},
                    "caption1": f"thing {k}",
                    "caption2": f"thing {k + 1}",
                }
                for k in range(6)
            ]
        )
    )


def test_a_recipe_runs_from_the_release_generated_file_without_captioning(trees, tmp_path, capsys):
    ids = list(json.loads((trees["cirr"] / "cirr" / "image_splits" / "split.rc2.train.json").read_text()))
    _release_cirr_file(tmp_path / "cap.rc2.train.extend_clip.json", ids)
    argv = ["run", "clip4cir-cirr", "--model", f"{trees['factory']}:build", "--root", str(trees["cirr"]),
            "--out", str(tmp_path / "run"), "--generated", str(tmp_path / "cap.rc2.train.extend_clip.json"),
            "--transform", "clip", "--image-size", "4", "--epochs", "1", "--batch-size", "4", "--no-progress",
            "--release"]
    assert run_command("recipe", argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["triplets"] == {"annotated": 5, "generated": 6}
    assert results["recipe"]["stage2"]["mask_reference"] is False and results["recipe"]["bank"]["images"] == "triplets"
    # the release's bank: only the images the triplets name
    named = {i for i in ids[:7]} | set()
    assert results["bank_shape"][0] < 12 and results["bank_shape"][0] >= len(named)


def test_the_clip4cir_example_factory_runs_a_recipe(trees, tmp_path, capsys):
    """The README's CLIP4Cir line: the example's checkpoint factory, targetpad, FashionIQ's three categories."""
    import _tiny_clip

    clip = _tiny_clip.save_tiny_clip(tmp_path / "clip", ["a", "dress", "shirt", "toptee", "with", "pattern"],
                                     seed=0, image_size=24, patch_size=8, width=32, projection_dim=16)
    argv = ["run", "clip4cir-fashioniq", "--model", f"{EXAMPLES / 'clip4cir' / '_common.py'}:factory",
            "--factory-kwargs", json.dumps({"checkpoint": str(clip)}), "--root", str(trees["fashioniq"]),
            "--out", str(tmp_path / "run"), "--captioner", f"file:{trees['captions']}", "--image-size", "24",
            "--rank-window", "fractions", "--epochs", "1", "--batch-size", "4", "--steps-per-epoch", "1",
            "--eval-batch-size", "16", "--no-progress"]
    assert run_command("recipe", argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["triplets"]["generated"] > 0 and results["bank_shape"] == [24, 16]
    assert "clip4cir-fashioniq" in capsys.readouterr().out


def test_hf_captioner_gets_the_recipe_prompt_and_each_images_category(trees, monkeypatch):
    import argparse

    from cir_plugins.cli import recipe as recipe_command
    from cir_plugins.positives import captioners
    from cir_plugins.recipes.run import load_training_data

    class Unloaded(captioners.HFCaptioner):
        def __init__(self, model, **kwargs):  # records the settings instead of loading a model
            self.model_name, self.prompt_template, self.category, self.k = model, kwargs["prompt"], \
                kwargs["category"], kwargs["k"]

    monkeypatch.setattr(captioners, "HFCaptioner", Unloaded)
    categories = load_training_data("fashioniq", trees["fashioniq"], transform=None).categories
    args = argparse.Namespace(captioner="hf:some/llava", device=None, dtype=None, max_new_tokens=30,
                              caption_batch_size=8, skip_empty=False, trust_remote_code=False, root="", seed=0)
    made = recipe_command._captioner(args, load_recipe("clip4cir-fashioniq"), categories)
    assert made.prompt_for("B0toptee_train02") == "please briefly describe the toptee in 4 words"
    made = recipe_command._captioner(args, load_recipe("tgcir-cirr"), None)
    assert made.prompt_for("x") == "please briefly describe the image in 10 words"


def test_a_window_that_makes_nothing_is_an_error_naming_the_fix(trees, tmp_path, capsys):
    argv = ["run", "clip4cir-cirr", "--model", f"{trees['factory']}:build", "--root", str(trees["cirr"]),
            "--out", str(tmp_path / "run"), "--captioner", f"file:{trees['captions']}", "--transform", "clip",
            "--image-size", "4", "--no-progress"]  # the release's [10000, 15000) on the 7 images the triplets name
    assert run_command("recipe", argv) == 2
    err = capsys.readouterr().err
    assert "made no triplets from 7 images" in err and "10000" in err and "--rank-window fractions" in err


def test_reproduce_is_the_library_pieces_not_a_second_pipeline(trees, tmp_path, monkeypatch):
    """Each step goes through the library's own augmenter, bank builder, trainer and evaluate."""
    import cir_plugins.evaluation as evaluation
    from cir_plugins.negatives.bank import NegativeBank
    from cir_plugins.positives.augmenter import TripletAugmenter
    from cir_plugins.training.stage2 import Stage2Trainer

    calls = []

    def spy(owner, name, wrap_static=False):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, classmethod(lambda cls, *a, **k: wrapper(*a, **k)) if wrap_static else wrapper)

    spy(TripletAugmenter, "augment")
    spy(NegativeBank, "build", wrap_static=True)
    spy(Stage2Trainer, "fit")
    spy(evaluation, "evaluate")
    argv = ["run", "sprc-fashioniq", "--model", f"{trees['factory']}:build", "--root", str(trees["fashioniq"]),
            "--out", str(tmp_path / "run"), "--captioner", f"file:{trees['captions']}", "--transform", "clip",
            "--image-size", "4", "--epochs", "1", "--batch-size", "4", "--steps-per-epoch", "1", "--no-progress"]
    assert run_command("recipe", argv) == 0
    assert calls.count("augment") == 1 and calls.count("build") == 1 and calls.count("fit") == 1
    # before, the one epoch, after: each the three-category call and its one call per category
    assert calls.count("evaluate") == 3 * (1 + 3)
