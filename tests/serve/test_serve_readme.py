"""The README's serve example runs as written on the synthetic world: its two commands (build-bank over the served
split, then serve with the same --trained results), after a short stage 1 and stage 2, answer a search equal to
the library's exact one; the training bank (of train) served with --split val is refused, naming the fix."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from _toy import factory_source

pytest.importorskip("starlette", reason='the web page is an optional extra: pip install "cir-plugins[serve]"')
uvicorn = pytest.importorskip("uvicorn", reason='serving is an optional extra: pip install "cir-plugins[serve]"')

from starlette.testclient import TestClient  # noqa: E402

import cir_plugins as cp  # noqa: E402
from cir_plugins.cli import main  # noqa: E402
from cir_plugins.serve import GallerySearcher  # noqa: E402
from cir_plugins.serve.app import SEARCH_FIELDS  # noqa: E402

HERE = Path(__file__).resolve().parent
README = (HERE.parents[1] / "README.md").read_text()
FACTORY = factory_source()
WORLD = json.dumps(dict(n_train_triplets=12, n_train_unlabelled=0, n_val_queries=6, n_val_distractors=6,
                        n_test_queries=4, n_test_distractors=4, duplicate_rate=0.0))
DATA = "--dataset synthetic --root world --image-size 4"  # the synthetic world in place of data/CIRR


def serve_commands() -> list[list[str]]:
    """The README serve example's commands, the dataset flags replaced by the synthetic world's."""
    section = README.split("**Search a gallery in the browser**", 1)[1].split("**Large galleries on a CPU**", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    commands = []
    for line in block.replace("\\\n", " ").strip().splitlines():
        line = line.split("  #", 1)[0].replace("--dataset cirr --root data/CIRR", DATA)
        words = shlex.split(line)
        assert words[0] == "cir-plugins", line
        commands.append(words[1:])
    return commands


def _api_table() -> dict[str, tuple[str, str]]:
    """The README's JSON API table: the request's method and path -> (the request cell, the answer cell)."""
    section = README.split("The page and any script talk to the same JSON API:", 1)[1].strip().split("\n\n", 1)[0]
    rows = {}
    for line in section.strip().splitlines()[2:]:
        request, answer = line.strip("|").split(" | ", 1)
        rows[" ".join(request.strip("` ").split("`")[0].split()[:2])] = (request, answer)
    return rows


def _fields(cell: str) -> set[str]:
    """The quoted names of a README answer cell's first JSON object."""
    return set(re.findall(r'"(\w+)"', cell.split("}", 1)[0]))


def test_the_readme_serve_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_model.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_model", None)
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server: served.append(server.config.app))
    assert main(["world", "--root", "world", "--quick", "--config", WORLD]) == 0
    model, data = ["--model", "my_model:build"], shlex.split(DATA)
    short = ["--epochs", "1", "--batch-size", "8"]
    assert main(["stage1", *model, *data, *short, "--out", "runs/stage1"]) == 0
    assert main(["build-bank", *model, "--trained", "runs/stage1", *data, "--out", "runs/bank.safetensors"]) == 0
    assert main(["stage2", *model, "--trained", "runs/stage1", *data, "--bank", "runs/bank.safetensors", *short,
                 "--out", "runs/stage2"]) == 0
    commands = serve_commands()
    assert [c[0] for c in commands] == ["build-bank", "serve"]
    for command in commands:
        assert main(command) == 0, command
    app = served[-1]
    split = cp.load_cirr("world", "val", size=4)
    reference, text = split.triplets[0].reference, split.triplets[0].texts[0]
    answer = TestClient(app, base_url="http://127.0.0.1:8000").post(
        "/api/search", json={"text": text, "image_id": reference, "k": 5})
    assert answer.status_code == 200, answer.text
    import my_model

    trained = cp.load_trained(cp.load_trained(my_model.build(), "runs/stage1"), "runs/stage2")
    bank = cp.NegativeBank.load("runs/bank_val.safetensors")
    expected = GallerySearcher(trained.eval(), bank, split.images).search(text, image_id=reference, k=5)
    assert [r["id"] for r in answer.json()["results"]] == [r["id"] for r in expected["results"]]
    # the README's JSON API table names what the server answers and takes
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    api = _api_table()
    assert _fields(api["GET /api/info"][1]) == set(client.get("/api/info").json())
    assert _fields(api["GET /api/gallery?q=TEXT&offset=0&limit=60"][1]) == set(client.get("/api/gallery").json())
    search_request, search_answer = api["POST /api/search"]
    assert set(answer.json()) == {"index", "results"} and search_answer.startswith('`{"index": ')
    assert {"rank", "id", "ids", "score", "url"} == set(answer.json()["results"][0]) == _fields(
        search_answer.split("[", 1)[1])
    assert all(f'"{name}"' in search_request for name in SEARCH_FIELDS)
    # the training bank (of train) with --split val: refused before serving, the error naming the fix
    capsys.readouterr()
    wrong = [w if w != "runs/bank_val.safetensors" else "runs/bank.safetensors" for w in commands[1]]
    assert main(wrong) == 2
    err = capsys.readouterr().err
    assert "built over another split" in err and "--split" in err and "Traceback" not in err
