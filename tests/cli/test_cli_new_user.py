"""What a new user tripped over (issue 16), each checked where it used to go wrong."""

from __future__ import annotations

import json
import pydoc
from pathlib import Path

import pytest
import torch
from _toy import factory_source, pair_encoder_source
from torch import nn

import cir_plugins as cp
from cir_plugins.cli import main
from cir_plugins.cli.augment import DEFAULT_RANK_WINDOWS
from cir_plugins.data.fixtures import build_cirr_tree
from cir_plugins.errors import ConfigError, ModelProtocolError

CAPTIONS_AND_ENCODER = pair_encoder_source(8)
FACTORY = factory_source()


def cirr_workspace(tmp_path, monkeypatch, caption="a photo number {k}", factory=FACTORY):
    """A CIRR tree (train, val) and, in the working directory, captions.json (``caption`` per train image),
    the pair encoder enc.py and the model factory tiny_cir.py."""
    monkeypatch.chdir(tmp_path)
    root = build_cirr_tree(tmp_path / "cirr", n_images=18, n_triplets=6, splits=("train", "val"))
    ids = list(cp.load_cirr(root, "train").gallery_ids)
    Path("captions.json").write_text(json.dumps({i: caption.format(k=k) for k, i in enumerate(ids)}))
    Path("enc.py").write_text(CAPTIONS_AND_ENCODER)
    Path("tiny_cir.py").write_text(factory)
    return root


@pytest.fixture()
def cirr(tmp_path, monkeypatch):
    return cirr_workspace(tmp_path, monkeypatch)


def _augment(root, *extra):
    return main(["augment", "--dataset", "cirr", "--root", str(root), "--captioner", "file:captions.json",
                 "--pair-encoder", "enc:build", "--image-size", "4", "--out", "gen.json", "--no-progress", *extra])


# 1. an augment run that makes nothing is an error naming the window, the gallery size and the fix
def test_augment_without_triplets_is_an_error_and_the_default_window_suits_the_gallery(cirr, capsys):
    assert _augment(cirr, "--rank-window", "10000,15000") == 2
    err = capsys.readouterr().err
    assert "no triplets from 18 images" in err and "10000,15000" in err and "17 others" in err
    default = DEFAULT_RANK_WINDOWS["cirr"]  # the recommended recipe's window, the nearest 1% (at least one rank)
    assert f"--rank-window {default}" in err and "--allow-empty" in err
    assert not Path("gen.json").exists()
    assert _augment(cirr, "--rank-window", "10000,15000", "--allow-empty") == 0
    assert json.loads(Path("gen.json").read_text()) == []
    assert _augment(cirr) == 0  # the default window: fractions of N
    summary = json.loads(Path("gen.json.summary.json").read_text())
    assert summary["rank_window"] == default and summary["triplets"] == len(json.loads(Path("gen.json").read_text()))
    assert summary["triplets"] == 18 and summary["empty_windows"] == 0
    assert f"Default: {default}" in _help("augment")


def _help(command):
    from cir_plugins.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())


# 4. a module-form factory is imported from the working directory; a failure is one line
def test_module_form_factory_imports_from_the_working_directory(cirr, capsys):
    argv = ["evaluate", "--dataset", "cirr", "--root", str(cirr), "--image-size", "4", "--no-progress"]
    assert main(["evaluate", "--model", "tiny_cir:build", *argv[1:]]) == 0
    assert main(["evaluate", "--model", "factory:make", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no module named 'factory'" in err and "working directory" in err
    Path("broken.py").write_text("import not_installed_package\n")
    assert main(["evaluate", "--model", "broken:build", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'not_installed_package' is missing" in err
    with pytest.raises(ConfigError, match="tiny_cir has no function 'make'"):
        from cir_plugins._loading import load_factory
        load_factory("tiny_cir:make")


# 5. build-bank and evaluate skip unreadable images on request
def test_build_bank_and_evaluate_skip_unreadable_images(cirr, capsys):
    split = cp.load_cirr(cirr, "val")
    broken = split.triplets[0].target
    split.images.path_of(broken).write_bytes(b"")  # a zero-byte download
    common = ["--model", "tiny_cir:build", "--dataset", "cirr", "--root", str(cirr), "--split", "val",
              "--image-size", "4", "--no-progress"]
    assert main(["build-bank", *common, "--out", "bank.safetensors"]) == 2
    assert broken in capsys.readouterr().err
    assert main(["build-bank", *common, "--out", "bank.safetensors", "--skip-unreadable"]) == 0
    bank = cp.NegativeBank.load("bank.safetensors")
    assert broken not in bank.ids and len(bank.ids) == len(split.gallery_ids) - 1
    assert main(["evaluate", *common]) == 2
    assert main(["evaluate", *common, "--skip-unreadable", "--output", "r.json"]) == 0
    out = capsys.readouterr().out
    dropped = sum(broken in (t.reference, t.target, *t.members) for t in split.triplets)
    assert f"dropped {dropped} queries" in out
    assert json.loads(Path("r.json").read_text())["n_queries"] == len(split.triplets) - dropped


# 6. the config fields are documented where help() finds them, and in --help
@pytest.mark.parametrize("config", [cp.Stage1Config, cp.Stage2Config])
def test_config_fields_are_documented_in_help(config):
    import dataclasses

    text = " ".join(pydoc.render_doc(config, renderer=pydoc.plaintext).split())
    for f in dataclasses.fields(config):
        assert f"{f.name} (" in text, f.name
    assert "undocumented" not in text
    assert "mask each query's reference row" in " ".join(pydoc.render_doc(cp.Stage2Config,
                                                                          renderer=pydoc.plaintext).split())
    assert "(or duplicates) count once" in _help("stage1") and "--annotated-fraction" in _help("stage2")


# 7. one error for a model that does not meet the protocol, wherever it is first used
def test_one_error_for_a_model_without_the_protocol():
    model, images = nn.Linear(48, 8), {f"i{k}": torch.randn(3, 4, 4) for k in range(4)}
    triplets = [cp.Triplet("i0", "make it red", "i1")]
    calls = {
        "check_model": lambda: cp.check_model(model, torch.randn(1, 3, 4, 4), ["x"], torch.randn(2, 3, 4, 4)),
        "NegativeBank.build": lambda: cp.NegativeBank.build(model, list(images), images),
        "Stage1Trainer": lambda: cp.Stage1Trainer(model, triplets, images),
        "evaluation": lambda: cp.evaluate(model, _split(images, triplets), show_progress=False),
    }
    for where, call in calls.items():
        with pytest.raises(ModelProtocolError) as caught:
            call()
        message = str(caught.value)
        assert where in message and "Linear has no encode_image and no compose_query" in message, message
        assert "wrap_model(model, encode_image=..., compose_query=...)" in message


def _split(images, triplets):
    from cir_plugins.data.split import Split

    return Split(dataset="cirr", split="val", triplets=triplets, gallery_ids=list(images), images=images)


def test_texts_given_as_one_string_are_refused():
    from _toy import make_model

    images = torch.randn(1, 3, 4, 4)
    with pytest.raises(ModelProtocolError, match=r"a list of texts, one per query, not one string.*\['make"):
        cp.check_model(make_model(), images, "make it red", images)


# 3. a compose_query that fails on its input says what it was given and why
class ImagesOnly(nn.Module):
    """compose_query wants images, but the model also has encode_reference (so it gets features)."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(48, 8)
        self.text = nn.Linear(1, 8)

    def encode_image(self, images):
        return self.image(images.flatten(1))

    def encode_reference(self, images):
        return self.image(images.flatten(1))

    def compose_query(self, reference, texts):
        return self.image(reference.flatten(1)) + self.text(torch.ones(len(texts), 1))  # fails on (B, 8)


def test_compose_failure_names_encode_reference():
    images = torch.randn(2, 3, 4, 4)
    with pytest.raises(ModelProtocolError) as caught:
        cp.check_model(ImagesOnly(), images, ["a", "b"], images)
    message = str(caught.value)
    assert "compose_query raised RuntimeError" in message
    assert "given encode_reference's output (2, 8), not the images" in message and "reference_input" in message
    # where the library itself calls compose_query (evaluation, training), the model's own error passes
    # through with the same explanation attached as a note
    store = {f"i{k}": torch.randn(3, 4, 4) for k in range(4)}
    with pytest.raises(RuntimeError) as caught:
        cp.evaluate(ImagesOnly(), _split(store, [cp.Triplet("i0", "x", "i1")]), show_progress=False)
    assert any("given encode_reference's output (1, 8), not the images" in n for n in caught.value.__notes__)


# 8. quiet output: the CLI's spelling in advice, no advice to skip when skipping, bars only on a terminal
def test_bad_record_advice_uses_the_flag_and_is_not_repeated_when_skipping(cirr, capsys, caplog):
    path = cirr / "cirr" / "captions" / "cap.rc2.val.json"
    records = json.loads(path.read_text())
    del records[1]["reference"]
    path.write_text(json.dumps(records))
    argv = ["evaluate", "--model", "tiny_cir:build", "--dataset", "cirr", "--root", str(cirr), "--image-size", "4",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "record 1" in err and "--on-bad-record skip" in err and "on_bad_record=" not in err
    with caplog.at_level("WARNING"):
        assert main([*argv, "--on-bad-record", "skip"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "record 1" in r.getMessage()]
    assert warnings and not any("skip" in w.split("record 1", 1)[1] for w in warnings), warnings


def test_progress_bars_follow_the_terminal_unless_asked(monkeypatch):
    import io
    import sys

    from cir_plugins._console import format_values, progress_bar, progress_disabled

    assert (progress_disabled(True), progress_disabled(False), progress_disabled("always")) == (None, True, False)
    from cir_plugins.errors import ConfigError
    with pytest.raises(ConfigError, match=r"show_progress must be True, False or 'always'; got 'yes'"):
        progress_bar(range(3), desc="t", show_progress="yes")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # redirected: not a terminal
    assert progress_bar(range(3), desc="t", show_progress=True).disable is True
    assert progress_bar(range(3), desc="t", show_progress="always").disable is False
    assert format_values({"R@1": 57.49999999999999, "n_queries": 40.0, "lr": 2e-05, "protocol": {"name": "cirr"},
                          "ok": True}) == "R@1 57.50, n_queries 40, lr 2e-05, ok True"


def test_every_progress_bar_goes_through_the_one_helper():
    import ast

    package = Path(cp.__file__).parent
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                   if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "tqdm" in ast.unparse(n)
                          for n in ast.walk(ast.parse(p.read_text()))))
    assert users == ["_console.py"]


def test_dir_lists_public_names_only():
    names = dir(cp)
    assert "importlib" not in names and "annotations" not in names
    assert {"Stage1Trainer", "load_trained", "wrap_model", "check_model"} <= set(names)


def test_top_level_help_is_quick_and_each_command_parses_alone():
    """``cir-plugins --help`` lists every command without importing torch; a command's own flags still parse."""
    import subprocess
    import sys

    code = ("import sys\nfrom cir_plugins.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "stage1" in out and "submit" in out and "torch imported: False" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["-v", "evaluate", "--model", "x:y"])  # the command is found after an option
    assert exit_info.value.code == 2  # argparse: --dataset and --root are required


def test_config_flags_round_trip_into_the_config():
    """Every config field's flag reaches the config: numbers, 'none' for optional ones, pairs, --x/--no-x."""
    import argparse

    from cir_plugins.cli._common import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cp.Stage2Config)
    args = parser.parse_args(["--lr", "1e-4", "--betas", "0.9", "0.98", "--max-grad-norm", "1.5", "--no-mask-reference",
                              "--steps-per-epoch", "none", "--schedule", "cosine", "--learn-temperature"])
    config = config_from_args(cp.Stage2Config, args, output_dir="out")
    assert (config.lr, config.betas, config.max_grad_norm, config.mask_reference) == (1e-4, (0.9, 0.98), 1.5, False)
    assert config.steps_per_epoch is None and config.schedule == "cosine" and config.learn_temperature is True
    assert config.output_dir == "out" and config.cache_reference is True  # untouched fields keep their defaults
    defaults = config_from_args(cp.Stage2Config, parser.parse_args([]))
    assert defaults.to_dict() == cp.Stage2Config().to_dict()
    with pytest.raises(SystemExit):
        parser.parse_args(["--amp", "fp8"])  # choices come from the config's own list
