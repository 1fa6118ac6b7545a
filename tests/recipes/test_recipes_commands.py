"""Every command ``cir-plugins recipe list`` prints runs as printed, each recipe file agrees with itself, and a
stopped ``recipe run`` resumes to the result of an uninterrupted one.

The printed commands run as subprocesses from the repository root with no PYTHONPATH, as a user types them.
Only what the user fills in is replaced, by tiny stand-ins: the dataset roots (``DATA/...``: tiny trees in the
exact CIRR / FashionIQ layouts), the release's checkpoint files (tiny files in the exact CLIP4Cir and LAVIS
layouts, converted by the printed conversion command), the Hub models (a tiny CLIP, a tiny BLIP-2 base), the
captioner (a captions file), ``YOUR_*.py`` (a toy model factory) and the ``runs/`` folders. Every other word is
run as printed; a small budget (one stage-2 step, the fixtures' image size) is appended to each run line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _toy import factory_source

from cir_plugins.cli import recipe as recipe_command
from cir_plugins.data.fixtures import build_cirr_tree, build_fashioniq_tree
from cir_plugins.errors import ConfigError
from cir_plugins.recipes import list_recipes, load_recipe

REPO = Path(__file__).resolve().parents[2]
for _path in (str(REPO), str(REPO / "examples")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIP_SIZE, BLIP_SIZE, TINY_CLIP_SIZE = 64, 32, 24  # the tiny stand-ins' image sides
WORDS = ["a", "photo", "number", "of", "thing", "dress", "shirt", "toptee", "with", "pattern", "instead", "unlike",
         "i", "want"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """The tiny data sets, checkpoint files, captions and factories that the printed placeholders name."""
    import _tiny_clip
    from _toy import make_model
    from safetensors.torch import save_file
    from test_convert_clip4cir import tiny_openai_clip
    from test_convert_lavis import _saved, _sizes, lavis_state_dict

    from examples.blip2_sprc.model import make_tiny_checkpoint

    base = tmp_path_factory.mktemp("printed")
    made = {"DATA/cirr": build_cirr_tree(base / "cirr", n_images=12, n_triplets=5, splits=("train", "val")),
            "DATA/fashioniq": build_fashioniq_tree(base / "fiq", n_images=8, n_triplets=5, splits=("train", "val"))}
    captions = {}
    for name in json.loads((made["DATA/cirr"] / "cirr" / "image_splits" / "split.rc2.train.json").read_text()):
        captions[name] = f"a photo number {len(captions)} of a thing"
    for category in ("dress", "shirt", "toptee"):
        for name in json.loads((made["DATA/fashioniq"] / "image_splits" / f"split.{category}.train.json").read_text()):
            captions[name] = f"a {category} with pattern {len(captions)}"
    (base / "captions.json").write_text(json.dumps(captions))
    made[recipe_command.CAPTIONER] = f"file:{base / 'captions.json'}"
    # the release's starting files, in their exact layouts
    clip = base / "clip4cir_stage1.pt"
    torch.save({"epoch": 0, "CLIP": tiny_openai_clip()}, clip)
    made["cirr_clip_RN50x4_fullft.pt"] = made["fiq_clip_RN50x4_fullft.pt"] = clip
    blip_base = make_tiny_checkpoint(base / "blip2_base", WORDS)
    lavis = _saved(base, lavis_state_dict(*_sizes(blip_base)), name="sprc_stage1.pt")
    made["cirr_stage1.pt"] = made["fiq_stage1.pt"] = lavis
    made["Salesforce/blip2-itm-vit-g"] = blip_base
    made["openai/clip-vit-large-patch14"] = _tiny_clip.save_tiny_clip(
        base / "tiny_clip", WORDS, seed=0, image_size=TINY_CLIP_SIZE, patch_size=8, width=32, projection_dim=16)
    # the user's own TG-CIR / BLIP4CIR factory and stage-1 result
    factory = base / "toy_factory.py"
    factory.write_text(factory_source())
    made["YOUR_TGCIR.py:build"] = made["YOUR_BLIP4CIR.py:build"] = f"{factory}:build"
    toy = make_model(seed=0)
    stage1 = base / "toy_stage1.safetensors"
    save_file({n: p.detach().clone() for n, p in toy.named_parameters() if n.startswith("text")}, str(stage1))
    made["toy_stage1"] = stage1
    made["base"] = base
    return made


def _fill(command: str, recipe, stand_ins: dict, out: Path) -> str:
    """``command`` with each placeholder replaced by its stand-in; nothing else changes."""
    filled = command.replace(f"runs/{recipe.name}-stage1", str(stand_ins["toy_stage1"]) if recipe.start["trained"]
                             else str(out / "stage1"))
    filled = re.sub(rf" --out runs/{re.escape(recipe.name)}(?=\s|$)", f" --out {out / 'run'}", filled)
    for placeholder, value in stand_ins.items():
        if placeholder not in ("toy_stage1", "base"):
            filled = filled.replace(placeholder, str(value))
    leftover = [w for w in shlex.split(filled) if w.startswith(("runs/", "DATA/", "YOUR_", "hf:"))]
    assert not leftover, f"a placeholder the test does not know: {leftover} in {command}"
    return filled


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # cir-plugins and python
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _printed() -> dict[str, list[str]]:
    """recipe -> the commands ``cir-plugins recipe list`` prints under it (run as a user would)."""
    listed = subprocess.run(["cir-plugins", "recipe", "list"], cwd=REPO, env=_environment(), capture_output=True,
                            text=True, check=True).stdout
    commands: dict[str, list[str]] = {}
    current = None
    for line in listed.splitlines()[1:]:
        if not line.startswith(" "):
            current = line.split()[0]
            commands[current] = []
        else:
            commands[current].append(line.strip())
    return commands


@pytest.fixture(scope="module")
def printed():
    return _printed()


def test_recipe_list_prints_a_conversion_and_a_run_line_per_recipe(printed):
    assert sorted(printed) == list_recipes()
    for name, commands in printed.items():
        recipe = load_recipe(name)
        assert commands == recipe_command.commands_of(recipe)
        assert commands[-1].startswith(f"cir-plugins recipe run {name} ")
        assert (len(commands) == 2) == (recipe.start["convert"] is not None)


@pytest.mark.parametrize("name", list_recipes())
def test_every_printed_command_runs_as_printed(name, printed, stand_ins, tmp_path):
    recipe = load_recipe(name)
    image_size = {"clip4cir": CLIP_SIZE, "sprc": BLIP_SIZE, "zeroshot": TINY_CLIP_SIZE}.get(recipe.model, 4)
    budget = ["--image-size", str(image_size), "--rank-window", "fractions", "--epochs", "1", "--batch-size", "4",
              "--steps-per-epoch", "1", "--eval-batch-size", "16", "--no-before", "--no-progress"]
    if recipe.stage1_training is not None:
        budget += ["--stage1-epochs", "1"]
    for command in printed[name]:
        argv = shlex.split(_fill(command, recipe, stand_ins, tmp_path))
        if argv[:3] == ["cir-plugins", "recipe", "run"]:
            argv += budget
        done = subprocess.run(argv, cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["history"][0]["steps"] >= 1 and "Rmean" in results["after"]  # a stage-2 step, the evaluation
    assert name in done.stdout and "measured" in done.stdout


# ------------------------------------------------------------------------------------------------
# each recipe file agrees with itself: the model it describes, the conversion it prints, the factory it names


def _converted(recipe, stand_ins, tmp_path) -> Path | None:
    """Run the recipe's printed conversion in-process on the stand-in file; the folder it wrote."""
    if recipe.start["convert"] is None:
        return None
    argv = shlex.split(_fill(recipe.start["convert"], recipe, stand_ins, tmp_path))
    assert argv[:2] == ["python", "-m"]
    if argv[2] == "examples.clip4cir.convert":
        from examples.clip4cir.convert import main
    else:
        from examples.blip2_sprc.convert_lavis import main
    assert main(argv[3:]) == 0
    return tmp_path / "stage1"


@pytest.mark.parametrize("name", list_recipes())
def test_each_recipe_file_agrees_with_itself(name, stand_ins, tmp_path):
    from cir_plugins import protocol
    from cir_plugins._loading import load_factory

    recipe = load_recipe(name)
    start = recipe.start
    args = recipe_command.configure  # the run line parses with the command's own parser
    import argparse

    parser = argparse.ArgumentParser()
    args(parser)
    parsed = parser.parse_args(shlex.split(recipe_command.command_of(recipe))[2:])
    assert parsed.model == start["model"] and parsed.name == name
    assert json.loads(parsed.factory_kwargs) == start["factory_kwargs"] if start["factory_kwargs"] else True
    assert parsed.trained == ([start["trained"]] if start["trained"] else None)
    if recipe.model in ("tgcir", "blip4cir"):  # no model here: the user's factory and stage-1 result
        assert start["model"].startswith("YOUR_") and start["convert"] is None and start["trained"]
        return
    folder = _converted(recipe, stand_ins, tmp_path)
    kwargs = json.loads(_fill(json.dumps(start["factory_kwargs"]), recipe, stand_ins, tmp_path))
    model = load_factory(start["model"])(**kwargs)
    size = BLIP_SIZE if recipe.model == "sprc" else CLIP_SIZE if recipe.model == "clip4cir" else TINY_CLIP_SIZE
    images = torch.rand(2, 3, size, size)
    split = protocol.parameter_split(model, images, ["a thing", "a photo"], images)
    assert split.query and not set(split.query) & set(split.target)
    if recipe.model in ("clip4cir", "zeroshot"):
        # the description, the conversion and the factory: element-wise sum, no Combiner, the text tower trained
        assert recipe.fusion.startswith("element-wise sum") and "no Combiner" in recipe.fusion
        assert model.fusion == "sum" and not any("combiner" in n for n in split.query)
        assert not any("visual" in n or "vision" in n for n in split.query), split.query
        assert "clip.visual frozen" in recipe.trains
        if recipe.model == "clip4cir":
            assert "sum fusion" in recipe.model_label and "Combiner not used" in recipe.stage1
            assert "--combiner" not in start["convert"]
            assert json.loads((folder / "clip4cir.json").read_text())["fusion"] == "sum"
            assert start["convert"] in (REPO / "examples" / "clip4cir" / "README.md").read_text()
        else:
            assert start["factory_kwargs"]["fusion"] == "sum" and recipe.stage1_training is not None
    else:  # SPRC: the image-free pass's copy of the Q-Former (+ its embeddings) and the text projection train
        assert "copy of the Q-Former" in recipe.trains
        assert all(n.startswith(("model.query_qformer.", "model.query_embeddings.", "model.blip.text_projection."))
                   for n in split.query), split.query
        assert not any("vision" in n for n in split.query)
        assert start["convert"] in (REPO / "examples" / "blip2_sprc" / "README.md").read_text()
    assert (recipe.stage2.get("temperature_param") == "tau") == recipe.stage2["learn_temperature"]


# ------------------------------------------------------------------------------------------------
# recipe run --resume


def _run_argv(stand_ins, out: Path, *extra: str) -> list[str]:
    return ["run", "clip4cir-fashioniq", "--model", f"{stand_ins['YOUR_TGCIR.py:build'].split(':')[0]}:build",
            "--root", str(stand_ins["DATA/fashioniq"]), "--out", str(out), "--captioner",
            stand_ins[recipe_command.CAPTIONER], "--transform", "clip", "--image-size", "4", "--rank-window",
            "fractions", "--epochs", "3", "--batch-size", "4", "--steps-per-epoch", "2", "--eval-batch-size", "16",
            "--no-progress", *extra]


def test_a_stopped_run_resumes_to_the_result_of_an_uninterrupted_one(stand_ins, tmp_path, monkeypatch, capsys):
    from cir_plugins.cli import run_command
    from cir_plugins.negatives import bank as bank_module
    from cir_plugins.training import resume as resume_module

    assert run_command("recipe", _run_argv(stand_ins, tmp_path / "straight")) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())

    # the same run, stopped right after stage 2 wrote its epoch-1 checkpoint (as a kill between epochs)
    original_save = resume_module.Checkpointing._save

    def save_then_stop(self, name):
        original_save(self, name)
        if self.stage == "stage2" and name == "last" and self._epoch == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(resume_module.Checkpointing, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_command("recipe", _run_argv(stand_ins, tmp_path / "stopped"))
    monkeypatch.undo()
    stopped = tmp_path / "stopped"
    assert not (stopped / "results.json").exists() and (stopped / "generated.json").is_file()
    # its best checkpoint so far says, when loaded, that the run has not finished
    from cir_plugins.trained import read_trained

    assert read_trained(stopped / "stage2").unfinished == "epoch 1 of 3 done"

    # without --resume the folder is not overwritten; with it, nothing finished is redone
    assert run_command("recipe", _run_argv(stand_ins, stopped)) == 2
    assert "--resume" in capsys.readouterr().err
    built = []
    original_build = bank_module.NegativeBank.build.__func__

    def counting_build(cls, *args, **kwargs):
        bank = original_build(cls, *args, **kwargs)
        built.append(kwargs.get("cache_dir"))
        return bank

    monkeypatch.setattr(bank_module.NegativeBank, "build", classmethod(counting_build))
    generated = (stopped / "generated.json").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        from cir_plugins.positives import augmenter

        patch.setattr(augmenter.TripletAugmenter, "augment", lambda *a, **k: pytest.fail("generation was redone"))
        assert run_command("recipe", _run_argv(stand_ins, stopped, "--resume")) == 0
    assert (stopped / "generated.json").stat().st_mtime_ns == generated
    assert built == [stopped / "bank_shards"]  # the shard cache: every row reused
    resumed = json.loads((stopped / "results.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for key in ("after", "triplets", "bank_shape"):
        assert resumed[key] == straight[key], key
    assert {k: v for k, v in resumed["augment"].items() if k != "seconds"} == \
        {k: v for k, v in straight["augment"].items() if k != "seconds"}
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    for checkpoint in ("best", "last"):  # the trained weights, bit for bit
        a = read_trained(stopped / "stage2", checkpoint=checkpoint)
        b = read_trained(tmp_path / "straight" / "stage2", checkpoint=checkpoint)
        assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert read_trained(stopped / "stage2").unfinished is None


def test_resume_refuses_a_folder_of_another_recipe_or_other_settings(stand_ins, tmp_path, capsys):
    from cir_plugins.cli import run_command

    out = tmp_path / "run"
    assert run_command("recipe", _run_argv(stand_ins, out)[:-7] + ["--epochs", "1", "--steps-per-epoch", "1",
                                                                   "--eval-batch-size", "16", "--no-progress"]) == 0
    capsys.readouterr()
    other_seed = _run_argv(stand_ins, out, "--resume", "--seed", "1")
    assert run_command("recipe", other_seed) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed" in err and "--out" in err
    other_recipe = _run_argv(stand_ins, out, "--resume")
    other_recipe[1] = "tgcir-fashioniq"
    assert run_command("recipe", other_recipe) == 2
    assert "recipe.name" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# what the recipes carry into the run


def test_the_recipe_share_pool_texts_and_length_rule_reach_the_run(stand_ins, tmp_path, monkeypatch):
    """clip4cir-fashioniq: the sampler gets the release's share (0.59), generation pairs only the images the
    annotated triplets name, annotated triplets carry FashionIQ's four texts, and a text too long for the model's
    tokenizer becomes the target caption alone."""
    from _toy import make_model

    from cir_plugins.recipes.run import reproduce
    from cir_plugins.training import stage2 as stage2_module

    seen = {}
    original_init = stage2_module.Stage2Trainer.__init__

    def spy(self, model, bank, triplets, images, **kwargs):
        seen["config"], seen["triplets"] = kwargs["config"], list(triplets)
        original_init(self, model, bank, triplets, images, **kwargs)

    monkeypatch.setattr(stage2_module.Stage2Trainer, "__init__", spy)

    def limited():
        model = make_model()
        model.max_text_tokens, model.count_text_tokens = 3, lambda text: len(text.split())  # a 3-word text limit
        return model

    class Captioner:
        name = "three-words"

        def __call__(self, ids, images):
            return [f"pattern {i} here" for i in ids]  # 3 words: the template "{target}" always fits

    recipe = load_recipe("clip4cir-fashioniq")
    result = reproduce(recipe, limited(), stand_ins["DATA/fashioniq"], output_dir=tmp_path / "run",
                       captioner=Captioner(), transform="clip", image_size=4, rank_window=(0.0, 1.0),
                       stage2_overrides={"epochs": 1, "batch_size": 4, "steps_per_epoch": 1}, evaluate_before=False,
                       show_progress=False)
    assert seen["config"].annotated_fraction == 0.59 == recipe.stage2["annotated_fraction"]
    annotated = [t for t in seen["triplets"] if t.source == "annotated"]
    assert annotated and all(len(t.texts) == 4 for t in annotated)
    c0, c1 = annotated[0].meta["captions"]
    assert annotated[0].texts[2:] == (c0.strip(".?, "), c1.strip(".?, "))
    named = {i for t in annotated for i in (t.reference, t.target)}
    assert result.augment["pool"] == {"kind": "triplets", "images": len(named)}
    generated = [t for t in seen["triplets"] if t.source == "generated"]
    assert generated and {t.reference for t in generated} <= {t.reference for t in annotated}  # refer
    assert all(t.target in named for t in generated)

    # the CIRR templates over 3 words: each text replaced by the target caption alone ("truncate" cuts instead)
    cirr = load_recipe("clip4cir-cirr")
    for policy, expected in (("target", lambda t: t.meta["target_caption"]), ("truncate", None)):
        seen.clear()
        reproduce(cirr, limited(), stand_ins["DATA/cirr"], output_dir=tmp_path / policy, captioner=Captioner(),
                  transform="clip", image_size=4, rank_window=(0.0, 1.0), text_length=policy,
                  stage2_overrides={"epochs": 1, "batch_size": 4, "steps_per_epoch": 1}, evaluate_before=False,
                  show_progress=False)
        made = [t for t in seen["triplets"] if t.source == "generated"]
        assert made and all(len(text.split()) <= 3 for t in made for text in t.texts)
        if expected is not None:
            assert all(t.texts == (expected(t),) for t in made)
        else:
            assert any(text != t.meta["target_caption"] for t in made for text in t.texts)


def test_release_precision_needs_cuda_and_is_refused_clearly_on_cpu(stand_ins, tmp_path):
    from _toy import make_model

    from cir_plugins.recipes.run import reproduce

    with pytest.raises(ConfigError, match="CUDA"):
        reproduce(load_recipe("clip4cir-cirr"), make_model(), stand_ins["DATA/cirr"], output_dir=tmp_path,
                  precision="release", show_progress=False)
    with pytest.raises(ConfigError, match="precision"):
        reproduce(load_recipe("clip4cir-cirr"), make_model(), stand_ins["DATA/cirr"], output_dir=tmp_path,
                  precision="fp8", show_progress=False)


def test_a_pair_encoder_by_name_ranks_with_its_own_preprocessing(stand_ins, tmp_path):
    from PIL import Image

    from cir_plugins._loading import load_image_encoder

    encoder = load_image_encoder(f"hf:{stand_ins['openai/clip-vit-large-patch14']}")
    pixels = encoder.image_transform(Image.new("RGB", (40, 30), (200, 10, 10)))
    assert pixels.shape == (3, TINY_CLIP_SIZE, TINY_CLIP_SIZE)
    features = encoder.encode_image(torch.stack([pixels, pixels]))
    assert features.shape == (2, 16) and torch.isfinite(features).all()
    for bad in ("hf:", "timm:vit", f"hf:{tmp_path / 'nothing'}"):
        with pytest.raises(ConfigError):
            load_image_encoder(bad)


def test_recipe_run_ranks_partners_with_a_named_encoder_on_its_own_preprocessing(stand_ins, tmp_path):
    """The toy model sees 4-pixel images; the named CLIP ranks partners on its own 24-pixel preprocessing."""
    from cir_plugins.cli import run_command

    encoder = f"hf:{stand_ins['openai/clip-vit-large-patch14']}"
    argv = _run_argv(stand_ins, tmp_path / "run", "--pair-encoder", encoder)
    argv[argv.index("--epochs") + 1] = "1"
    assert run_command("recipe", argv) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["pair_encoder"] == encoder
    assert json.loads((tmp_path / "run" / "results.json").read_text())["triplets"]["generated"] > 0


def test_an_open_clip_encoder_by_name_uses_open_clip_and_its_transform(monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    from cir_plugins._loading import load_image_encoder

    made = {}

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 5)

        def encode_image(self, images):
            return self.proj(images.flatten(1))

    def create(name, pretrained=None):
        made.update(name=name, pretrained=pretrained)
        return Tiny(), None, "the model's own transform"

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    encoder = load_image_encoder("open_clip:ViT-L-14:openai")
    assert made == {"name": "ViT-L-14", "pretrained": "openai"}
    assert encoder.image_transform == "the model's own transform"
    assert encoder.encode_image(torch.rand(3, 3, 2, 2)).shape == (3, 5)
    load_image_encoder("open_clip:RN50")
    assert made == {"name": "RN50", "pretrained": None}


def test_a_fashioniq_split_offers_the_release_texts_on_request(stand_ins):
    from cir_plugins.data.fashioniq import load_fashioniq

    default = load_fashioniq(stand_ins["DATA/fashioniq"], "dress", "train")
    release = load_fashioniq(stand_ins["DATA/fashioniq"], "dress", "train", texts="release")
    for mine, theirs in zip(default.triplets, release.triplets):
        c0, c1 = theirs.meta["captions"]
        assert theirs.texts == (*mine.texts, c0.strip(".?, "), c1.strip(".?, ")) and len(mine.texts) == 2
        assert theirs.texts[0] == mine.texts[0]  # the evaluation text
    with pytest.raises(ConfigError, match="text variants"):
        load_fashioniq(stand_ins["DATA/fashioniq"], "dress", "train", texts="four")


def test_a_factory_that_imports_a_sibling_when_called_loads(tmp_path):
    """The printed CLIP4Cir command's failure: a factory importing its sibling lazily, after loading."""
    from cir_plugins._loading import load_factory

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "sibling_for_lazy_import.py").write_text("VALUE = 7\n")
    (folder / "factory.py").write_text("def build():\n    from sibling_for_lazy_import import VALUE\n"
                                       "    return VALUE\n")
    assert load_factory(f"{folder / 'factory.py'}:build")() == 7
    sys.modules.pop("sibling_for_lazy_import", None)


def test_docs_recipes_page_is_the_recipe_files(capsys):
    """docs/recipes.md is generated from the recipe files; each section is what `recipe show NAME --markdown` prints."""
    from cir_plugins.cli import run_command
    from cir_plugins.recipes import recipes_page

    page = (REPO / "docs" / "recipes.md").read_text()
    assert page == recipes_page(), "regenerate: python -c \"from cir_plugins.recipes import recipes_page; " \
                                   "open('docs/recipes.md', 'w').write(recipes_page())\""
    for name in list_recipes():
        assert run_command("recipe", ["show", name, "--markdown"]) == 0
        section = capsys.readouterr().out
        assert section.rstrip("\n") in page and all(c in section for c in load_recipe(name).commands())
        recipe = load_recipe(name)
        assert f"Annotated share: {recipe.stage2['annotated_fraction']}" in section
