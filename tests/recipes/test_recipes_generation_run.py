"""What ``reproduce`` generates with a recipe: pairs with equal captions are kept (the release keeps them), and a
recipe's ``generation.rewriter`` is built on the model's device with the run's seed."""

from __future__ import annotations

import json

import pytest
from _toy import make_model

from cir_plugins.data.fixtures import build_cirr_tree
from cir_plugins.recipes import RECIPE_DIR, load_recipe
from cir_plugins.recipes.run import reproduce

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BUDGET = {"epochs": 1, "batch_size": 4, "steps_per_epoch": 1}


class SameCaption:
    name = "same-caption"

    def __call__(self, ids, images):
        return ["a thing on a table" for _ in ids]


@pytest.fixture(scope="module")
def cirr(tmp_path_factory):
    return build_cirr_tree(tmp_path_factory.mktemp("cirr"), n_images=12, n_triplets=5, splits=("train", "val"))


def test_reproduce_keeps_pairs_whose_captions_are_equal(cirr, tmp_path):
    result = reproduce(load_recipe("clip4cir-cirr"), make_model(), cirr, output_dir=tmp_path / "run",
                       captioner=SameCaption(), transform="clip", image_size=4, rank_window=(0.0, 1.0),
                       stage2_overrides=BUDGET, evaluate_before=False, show_progress=False)
    assert result.triplets["generated"] > 0
    assert result.augment["kept_same_caption"] == result.augment["pairs"] > 0
    assert result.augment["skipped_same_caption"] == 0


def test_a_recipe_rewriter_runs_on_the_model_device_with_the_run_seed(cirr, tmp_path, monkeypatch):
    from cir_plugins.positives import rewriters

    made = {}

    class Echo:  # a rewriter that keeps every pair's template texts
        name = "echo"

        def rewrite_pairs(self, pairs, texts, *, cache_path=None, show_progress=True):
            made["cache_path"] = cache_path
            return rewriters.RewriteRun(texts=[list(t) for t in texts], fallback=len(texts))

    def from_spec(spec, **kwargs):
        made.update(spec=spec, **kwargs)
        return Echo()

    monkeypatch.setattr(rewriters, "rewriter_from_spec", from_spec)
    data = json.loads((RECIPE_DIR / "clip4cir-cirr.json").read_text())
    data["generation"]["rewriter"] = "hf:some/chat-model"
    (tmp_path / "clip4cir-cirr.json").write_text(json.dumps(data))
    model = make_model()
    result = reproduce(load_recipe(str(tmp_path / "clip4cir-cirr.json")), model, cirr, output_dir=tmp_path / "run",
                       captioner=SameCaption(), transform="clip", image_size=4, rank_window=(0.0, 1.0), seed=3,
                       stage2_overrides=BUDGET, evaluate_before=False, show_progress=False)
    assert made["spec"] == "hf:some/chat-model" and made["seed"] == 3
    assert str(made["device"]) == str(next(model.parameters()).device)
    assert made["cache_path"] is not None and made["cache_path"].parent == tmp_path / "run" / "captions"
    assert result.augment["rewrite"]["rewriter"] == "echo"


def test_copies_outside_the_pairing_pool_share_one_bank_row(tmp_path):
    """The recipe pairs only the images its annotated triplets name, but its bank holds every train image: two
    pixel-identical images outside that pool must still be one bank row (a copy of a target is never its
    negative)."""
    import shutil

    root = build_cirr_tree(tmp_path / "cirr", n_images=16, n_triplets=4, splits=("train", "val"))
    split = json.loads((root / "cirr" / "image_splits" / "split.rc2.train.json").read_text())
    named = set()
    for t in json.loads((root / "cirr" / "captions" / "cap.rc2.train.json").read_text()):
        named |= {t["reference"], t["target_hard"], *t["img_set"]["members"]}
    outside = [name for name in split if name not in named]
    assert len(outside) >= 2
    shutil.copyfile(root / split[outside[0]], root / split[outside[1]])  # a pixel-identical copy
    result = reproduce(load_recipe("clip4cir-cirr"), make_model(), root, output_dir=tmp_path / "run",
                       captioner=SameCaption(), transform="clip", image_size=4, rank_window=(0.0, 1.0),
                       stage2_overrides=BUDGET, evaluate_before=False, show_progress=False)
    assert result.bank_shape[0] == len(split) - 1
