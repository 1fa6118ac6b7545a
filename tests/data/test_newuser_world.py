"""The shipped world as a new user meets it: `world` prints a short summary (the statistics stay in its JSON
file), check-data checks it with its own splits and counts, and progress bars do not fill a log file."""

from __future__ import annotations

import io
import json
import sys

import pytest

from cir_plugins._console import REDIRECTED_INTERVAL_S, progress_bar
from cir_plugins.cli import main
from cir_plugins.data.check import check_dataset

WORLD = json.dumps(dict(n_train_triplets=6, n_train_unlabelled=4, n_val_queries=3, n_val_distractors=3,
                        n_test_queries=3, n_test_distractors=3))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "world"
    assert main(["world", "--root", str(root), "--quick", "--config", WORLD, "--no-progress"]) == 0
    return root


def test_world_prints_a_summary_and_keeps_the_statistics_in_its_file(tmp_path, capsys):
    root = tmp_path / "w"
    assert main(["world", "--root", str(root), "--quick", "--config", WORLD, "--no-progress"]) == 0
    out = capsys.readouterr().out
    stats = json.loads((root / "synthetic" / "world.json").read_text())["stats"]
    assert len(out.splitlines()) <= 10 and "{" not in out
    for split in ("train", "val", "test"):
        assert f"{split}: {stats['images'][split]} images, {stats['queries'][split]} queries" in out
    assert f"full statistics: {root / 'synthetic' / 'world.json'}" in out


@pytest.mark.parametrize("dataset", ["synthetic", "cirr"])
def test_check_data_checks_the_shipped_world_with_its_splits_and_counts(world, dataset, capsys):
    assert main(["check-data", "--dataset", dataset, "--root", str(world), "--no-progress"]) == 0  # cirr: detected
    out = capsys.readouterr().out
    assert "COMPLETE" in out and "INCOMPLETE" not in out and "test1" not in out
    report = check_dataset(world, dataset)
    assert report.ok and [u["name"] for u in report.splits] == ["train", "val", "test"]
    assert all(u["counts_match"] for u in report.splits)


def test_the_readme_check_data_command_runs_as_written_on_the_world(world, tmp_path, monkeypatch, capsys):
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("**Check a dataset before training on it**", 1)[1].split("**Search a gallery", 1)[0]
    lines = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].strip().splitlines()
    assert len(lines) == 1
    words = shlex.split(lines[0].split("  #", 1)[0].replace("data/CIRR", str(world)))
    assert words[0] == "cir-plugins"
    monkeypatch.chdir(tmp_path)
    assert main(words[1:]) == 0  # the world detected under --dataset cirr
    assert "COMPLETE" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "check.json").read_text())["ok"] is True


def test_check_data_synthetic_compares_with_the_recorded_counts(world, tmp_path):
    import shutil

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    split_file = copy / "cirr" / "image_splits" / "split.rc2.val.json"
    names = json.loads(split_file.read_text())
    split_file.write_text(json.dumps(dict(list(names.items())[:-1])))  # one image fewer than the world made
    report = check_dataset(copy, "synthetic")
    assert not report.ok and any(p.startswith("val: ") and "images" in p for p in report.problems)


def test_a_bar_asked_for_on_a_redirected_stderr_redraws_once_a_minute(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
    bar = progress_bar(range(3), desc="t", show_progress="always")
    assert bar.disable is False and bar.mininterval == REDIRECTED_INTERVAL_S == 60
    for _ in bar:
        pass
    assert sys.stderr.getvalue().count("\r") <= 2  # drawn when it starts and when it ends
    assert progress_bar(range(3), desc="t", show_progress=True).disable is True  # auto: no bar at all

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_bar(range(3), desc="t", show_progress="always").mininterval < 1  # a live bar on a terminal
