"""What a trained folder and a bank were made with is recorded and checked: each way the command line used to
give wrong numbers without a word (another --transform than the bank or the trained folder, stage-2 weights
without their stage-1 base, --trained in reversed order) is now an error naming both sides, with
--allow-provenance-mismatch to go on; the transform is read from the result or the bank when not given; old
results and banks without the record still load, saying so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _toy import factory_source

import cir_plugins as cp
from cir_plugins.cli import main
from cir_plugins.data.fashioniq import load_split

FACTORY = factory_source()
WORLD = json.dumps(dict(n_train_triplets=16, n_train_unlabelled=8, n_val_queries=8, n_val_distractors=8,
                        n_test_queries=4, n_test_distractors=4, duplicate_rate=0.0))


class Run:
    """Paths of the module's tiny pipeline (trained with --transform squarepad, a 4-pixel image)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = f"{root / 'my_model.py'}:build"
        self.world = str(root / "world")
        self.stage1, self.stage2 = str(root / "stage1"), str(root / "stage2")
        self.bank = str(root / "bank.safetensors")

    def data(self, *extra: str) -> list[str]:
        return ["--dataset", "synthetic", "--root", self.world, "--image-size", "4", *extra]

    def evaluate(self, *trained: str, extra: tuple[str, ...] = ()) -> list[str]:
        flags = [word for path in trained for word in ("--trained", path)]
        return ["evaluate", "--model", self.model, *flags, *self.data("--split", "val", "--no-progress", *extra)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    (root / "my_model.py").write_text(FACTORY)
    r = Run(root)
    common = ["--epochs", "1", "--batch-size", "8", "--no-progress"]
    assert main(["world", "--root", r.world, "--quick", "--config", WORLD, "--no-progress"]) == 0
    assert main(["stage1", "--model", r.model, *r.data("--transform", "squarepad"), "--out", r.stage1, *common]) == 0
    # no --transform from here on: read from what stage 1 recorded
    assert main(["build-bank", "--model", r.model, "--trained", r.stage1, *r.data(), "--out", r.bank,
                 "--no-progress"]) == 0
    assert main(["stage2", "--model", r.model, "--trained", r.stage1, *r.data(), "--bank", r.bank,
                 "--out", r.stage2, *common]) == 0
    return r


def _error(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_what_results_and_banks_record(run):
    stage1, stage2 = cp.trained.read_trained(run.stage1), cp.trained.read_trained(run.stage2)
    assert stage1.made_with["preprocessing"]["kind"] == "squarepad" and stage1.made_with["base"] == []
    assert stage2.made_with["preprocessing"]["kind"] == "squarepad"
    assert stage2.made_with["base"] == [{"path": run.stage1, "fingerprint": stage1.fingerprint}]
    bank = cp.NegativeBank.load(run.bank)
    assert bank.preprocessing == stage1.made_with["preprocessing"]  # inferred from stage 1, then recorded
    assert stage1.fingerprint != stage2.fingerprint


def test_the_transform_is_read_from_the_trained_result(run, capsys, caplog):
    caplog.set_level("INFO")
    assert main(run.evaluate(run.stage1, run.stage2, extra=("--output", str(run.root / "val.json")))) == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"--trained {run.stage1} recorded: --transform squarepad --image-size 4" in logged
    # the same numbers as with the flag written out
    assert main(run.evaluate(run.stage1, run.stage2, extra=("--transform", "squarepad",
                                                            "--output", str(run.root / "val2.json")))) == 0
    assert json.loads((run.root / "val.json").read_text()) == json.loads((run.root / "val2.json").read_text())


def test_evaluate_with_another_transform_than_recorded_is_an_error(run, capsys):
    assert main(run.evaluate(run.stage1, run.stage2, extra=("--transform", "clip"))) == 2
    error = _error(capsys)
    assert "--transform clip --image-size 4 here" in error
    assert f"--transform squarepad --image-size 4 for --trained {run.stage1}" in error
    assert "--allow-provenance-mismatch" in error


def test_stage2_weights_without_their_stage1_base_are_an_error(run, capsys):
    assert main(run.evaluate(run.stage2)) == 2
    error = _error(capsys)
    assert f"--trained {run.stage2} was trained on top of {run.stage1} (weights" in error
    assert "goes on top of nothing (the factory's model)" in error
    assert f"--trained {run.stage1} --trained {run.stage2}" in error  # the fix: the order it was trained in


def test_trained_in_reversed_order_is_an_error(run, capsys):
    assert main(run.evaluate(run.stage2, run.stage1)) == 2
    assert f"--trained {run.stage2} was trained on top of {run.stage1}" in _error(capsys)


def test_the_flag_turns_a_mismatch_into_a_warning(run, capsys, caplog):
    assert main(run.evaluate(run.stage2, extra=("--allow-provenance-mismatch",))) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("was trained on top of" in m and "going on: --allow-provenance-mismatch" in m for m in warned)


def test_stage2_on_a_bank_built_under_another_transform_is_an_error(run, capsys):
    other = str(run.root / "bank_clip.safetensors")
    assert main(["build-bank", "--model", run.model, "--trained", run.stage1, *run.data("--transform", "clip"),
                 "--out", other, "--no-progress"]) == 2  # against stage 1's record already
    assert main(["build-bank", "--model", run.model, "--trained", run.stage1, *run.data("--transform", "clip"),
                 "--out", other, "--no-progress", "--allow-provenance-mismatch"]) == 0
    capsys.readouterr()
    stage2 = ["stage2", "--model", run.model, "--trained", run.stage1, "--bank", other, "--epochs", "1",
              "--out", str(run.root / "stage2_clip"), "--no-progress"]
    assert main([*stage2, *run.data()]) == 2  # squarepad (from stage 1) against the bank's clip
    error = _error(capsys)
    assert f"--transform squarepad --image-size 4 here, --transform clip --image-size 4 for --bank {other}" in error
    assert main([*stage2, *run.data("--transform", "clip")]) == 2  # now stage 1 disagrees
    assert f"--transform squarepad --image-size 4 for --trained {run.stage1}" in _error(capsys)


def test_old_results_and_banks_without_the_record_still_load(run, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    old_weights = tmp_path / "stage1.safetensors"  # a bare weights file records nothing
    shutil.copy(Path(run.stage1) / "checkpoints" / "last" / "weights.safetensors", old_weights)
    bank = cp.NegativeBank.load(run.bank)
    bank.preprocessing = None  # as banks were saved before they recorded it
    old_bank = tmp_path / "bank.safetensors"
    bank.save(old_bank)
    assert cp.NegativeBank.load(old_bank).preprocessing is None
    assert main(["stage2", "--model", run.model, "--trained", str(old_weights), *run.data("--transform", "squarepad"),
                 "--bank", str(old_bank), "--epochs", "1", "--out", str(tmp_path / "s2"), "--no-progress"]) == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"--trained {old_weights} does not record what it was trained with" in logged
    assert f"{old_bank} does not record its images' preprocessing" in logged
    # the stage-2 result it wrote names the bare file as its base, so the chain is still checked
    assert main(run.evaluate(str(tmp_path / "s2"))) == 2
    assert main(run.evaluate(str(old_weights), str(tmp_path / "s2"))) == 0


def test_a_shared_copy_has_the_fingerprint_of_its_run(run, tmp_path):
    folder = cp.save_trained(run.stage1, tmp_path / "shared")
    assert cp.trained.read_trained(folder).fingerprint == cp.trained.read_trained(run.stage1).fingerprint


def _log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_a_shared_folder_carries_what_its_result_was_made_with(run, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    stage1, stage2 = cp.trained.read_trained(run.stage1), cp.trained.read_trained(run.stage2)
    assert cp.trained.read_trained(cp.save_trained(run.stage1, tmp_path / "s1")).made_with == stage1.made_with
    # stage 2 merged onto its stage-1 base: the folder alone is the whole result, its preprocessing recorded
    merged = str(cp.save_trained(run.stage2, tmp_path / "merged", on_top_of=[run.stage1]))
    assert cp.trained.read_trained(merged).made_with == {**stage2.made_with, "base": []}
    caplog.clear()
    assert main(run.evaluate(merged)) == 0
    assert "does not record" not in _log(caplog)
    assert f"--trained {merged} recorded: --transform squarepad --image-size 4" in _log(caplog)
    assert main(run.evaluate(merged, extra=("--transform", "clip"))) == 2
    assert f"--transform squarepad --image-size 4 for --trained {merged}" in _error(capsys)
    # stage 2 alone still needs its stage-1 base, as the run folder does
    alone = str(cp.save_trained(run.stage2, tmp_path / "alone"))
    assert main(run.evaluate(alone)) == 2 and f"--trained {alone} was trained on top of" in _error(capsys)
    assert main(run.evaluate(run.stage1, alone)) == 0
    # merging results it was not trained on is refused before anything is written
    with pytest.raises(cp.errors.ConfigError, match="was trained on top of .*on_top_of merges other results"):
        cp.save_trained(run.stage2, tmp_path / "wrong", on_top_of=[run.stage2])
    assert not (tmp_path / "wrong").exists()


def _python_stage2(run, tmp_path, transform: str, **kwargs):
    """A stage-2 trainer made in Python (no made_with) on the world's train split under ``transform``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("provenance_model", run.root / "my_model.py")
    factory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(factory)
    model = cp.load_trained(factory.build(), run.stage1)
    split = load_split(run.world, "synthetic", "train", transform=transform, size=4)
    config = cp.Stage2Config(epochs=1, batch_size=8, output_dir=str(tmp_path / "py_stage2"), show_progress=False)
    return cp.Stage2Trainer(model, cp.NegativeBank.load(run.bank), split.triplets, split.images, config=config,
                            **kwargs)


def test_a_python_stage2_checks_its_images_against_the_bank(run, tmp_path, caplog):
    with pytest.raises(cp.errors.DataError) as caught:
        _python_stage2(run, tmp_path, "clip")  # the bank was built under squarepad
    message = " ".join(str(caught.value).split())
    assert "{'kind': 'clip'} here, {'kind': 'squarepad'} for the bank" in message
    assert "allow_preprocessing_mismatch=True" in message
    _python_stage2(run, tmp_path, "clip", allow_preprocessing_mismatch=True)
    assert any("going on: allow_preprocessing_mismatch" in r.getMessage() for r in caplog.records)
    # the same preprocessing trains; a result made in Python records no base, so its order is not checked
    _python_stage2(run, tmp_path, "squarepad").fit()
    caplog.set_level("INFO")
    assert main(run.evaluate(run.stage1, str(tmp_path / "py_stage2"))) == 0
    assert f"--trained {tmp_path / 'py_stage2'} does not record the results it was trained on" in _log(caplog)
