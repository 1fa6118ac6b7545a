"""The whole command-line path a new user takes: the README's "From a trained model to a leaderboard file"
commands, run as written on a tiny synthetic world with a tiny model factory: world -> augment (default
window) -> stage1 -> build-bank -> stage2 -> evaluate -> submit, each trained result carried to the next
step by ``--trained`` alone (no hand-written loader)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from _toy import factory_source

import cir_plugins as cp
from cir_plugins.cli import main
from cir_plugins.data.synthetic import load_scenes
from cir_plugins.submission import submit_cirr

HERE = Path(__file__).resolve().parent
README = (HERE.parents[1] / "README.md").read_text()
# the factory module the README names (my_model:build), in the working directory
FACTORY = factory_source()
WORLD = json.dumps(dict(n_train_triplets=16, n_train_unlabelled=24, n_val_queries=8, n_val_distractors=8,
                        n_test_queries=8, n_test_distractors=8, duplicate_rate=0.0))
# what differs from the README on the synthetic world: its dataset flags (a 4-pixel image for the tiny
# model) and its evaluation split with targets, named test rather than test1
DATA = "--dataset synthetic --root world --image-size 4"


def readme_commands() -> list[list[str]]:
    """The README section's commands, its variables expanded (DATA replaced by the synthetic world's)."""
    section = README.split("## From a trained model to a leaderboard file", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    variables, commands = {}, []
    for line in block.strip().splitlines():
        line = line.split("  #", 1)[0].strip()
        assignment = re.fullmatch(r"(\w+)=(.*)", line)
        if assignment:
            variables[assignment[1]] = DATA if assignment[1] == "DATA" else shlex.split(assignment[2])[0]
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        words = shlex.split(line.replace("--split test1", "--split test"))
        assert words[0] == "cir-plugins", line
        commands.append(words[1:])
    return commands


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_model.py").write_text(FACTORY)
    return tmp_path


def test_readme_commands_from_world_to_leaderboard_file(workdir, capsys, caplog):
    caplog.set_level("INFO")
    assert main(["world", "--root", "world", "--quick", "--config", WORLD]) == 0
    captions = {i: scene["caption"] for i, scene in load_scenes("world").items()}
    Path("captions.json").write_text(json.dumps(captions))  # the README's captioner: a captions file
    commands = readme_commands()
    assert [c[0] for c in commands] == ["augment", "stage1", "build-bank", "stage2", "evaluate", "submit"]
    for command in commands:
        assert main(command) == 0, command
    assert len(json.loads(Path("runs/generated.json").read_text())) > 0  # the default window found partners
    out = capsys.readouterr().out
    assert "Rmean" in out and "wrote runs/stage2" in out
    # quiet, rounded logs: no float printed to 15 digits, no protocol description per epoch
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "stage2 epoch 1/3: " in logged and "protocol" not in logged
    assert not re.search(r"\d\.\d{5,}", logged + out), re.search(r".*\d\.\d{5,}.*", logged + out).group(0)
    assert "n_queries 8" in out and "n_queries 8.00" not in out

    # the files are those of the trained model: the library on the same weights writes the same ranking,
    # and the untrained model another one (so --trained did put the weights on)
    from cir_plugins._loading import load_factory

    build = load_factory("my_model:build")
    split = cp.load_cirr("world", "test", size=4)
    trained = cp.load_trained(cp.load_trained(build(), "runs/stage1"), "runs/stage2")
    val = cp.evaluate(trained, cp.load_cirr("world", "val", size=4), show_progress=False)
    assert json.loads(Path("runs/val.json").read_text())["Rmean"] == pytest.approx(val["Rmean"])
    for name, model in (("trained", trained), ("untrained", build())):
        submit_cirr(model, split, name, show_progress=False)
    written = Path("runs/submission/recall_submission_cirr.json").read_text()
    assert written == Path("trained/recall_submission_cirr.json").read_text()
    assert written != Path("untrained/recall_submission_cirr.json").read_text()
    assert len(json.loads(written)) == 2 + len(split.triplets)  # version, metric and one ranking per pair
