"""check-data on one bad image path (a symlink loop, a name over 255 characters, a link out of the root, a NUL)
reports that image and checks the rest of its split; an image that build-bank's transform would refuse is
reported too, with or without --decode, for the --transform given."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from cir_plugins.cli import main
from cir_plugins.data.check import check_dataset
from cir_plugins.data.fixtures import build_cirr_tree


@pytest.fixture()
def cirr(tmp_path):
    root = build_cirr_tree(tmp_path / "data")
    split_file = root / "cirr" / "image_splits" / "split.rc2.val.json"
    paths = json.loads(split_file.read_text())
    return root, split_file, paths, next(iter(paths))


def _break(kind, root, split_file, paths, name, tmp_path):
    file = root / paths[name]
    if kind == "symlink loop":
        file.unlink()
        os.symlink(file.name, file)
    elif kind == "name over 255 characters":
        paths[name] = "./dev/" + "a" * 300 + ".png"
    elif kind == "link out of the root":
        (tmp_path / "outside.png").write_bytes(file.read_bytes())
        file.unlink()
        os.symlink(tmp_path / "outside.png", file)
    elif kind == "NUL in the split file":
        paths[name] = "./dev/a\x00b.png"
    split_file.write_text(json.dumps(paths))


KINDS = ["symlink loop", "name over 255 characters", "link out of the root", "NUL in the split file"]


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_one_bad_path_is_that_image_s_problem_and_the_rest_is_checked(cirr, tmp_path, kind, decode):
    root, split_file, paths, name = cirr
    _break(kind, root, split_file, paths, name, tmp_path)
    report = check_dataset(root, "cirr", counts=None, decode=decode)
    val = next(u for u in report.splits if u["name"] == "val")
    assert val["error"] is None and val["images"] == len(paths)  # the split loaded: no blame on the split file
    assert val["bad_images"] == [name] and not report.ok
    assert [e["names"] for e in report.images["bad_path"]] == [[name]]
    assert report.images["checked"] == 3 * len(paths) - 1  # every other file was checked
    assert all(u["error"] is None and not u["bad_images"] for u in report.splits if u["name"] != "val")
    text = report.format()
    assert "bad path (1)" in text and name in text and "not loaded" not in text
    assert any("bad image paths" in a for a in report.advice)
    assert not any("annotation or split file did not load" in a for a in report.advice)


@pytest.mark.parametrize("kind", KINDS)
def test_the_command_reports_instead_of_stopping(cirr, tmp_path, kind, capsys):
    root, split_file, paths, name = cirr
    _break(kind, root, split_file, paths, name, tmp_path)
    code = main(["check-data", "--dataset", "cirr", "--root", str(root), "--counts", "none", "--no-progress",
                 "--report", str(tmp_path / "report.json")])
    printed = capsys.readouterr()
    assert code == 1 and "INCOMPLETE" in printed.out and "Traceback" not in printed.err
    assert json.loads((tmp_path / "report.json").read_text())["images"]["bad_path"][0]["names"] == [name]


@pytest.mark.parametrize("decode", [False, True])
def test_an_image_the_transform_would_refuse_is_reported(cirr, decode, capsys):
    root, _, paths, name = cirr
    Image.new("1", (200000, 1)).save(root / paths[name], optimize=True)  # a few hundred bytes
    assert (root / paths[name]).stat().st_size < 400
    for transform in ("targetpad", "clip"):
        report = check_dataset(root, "cirr", counts=None, decode=decode, transform=transform)
        assert [e["names"] for e in report.images["too_large"]] == [[name]] and not report.ok
        assert "pixel limit" in report.images["too_large"][0]["error"]
    # without a transform's padding or resize (none), 200000 pixels are within the limit
    assert check_dataset(root, "cirr", counts=None, decode=decode, transform="none").ok
    common = ["check-data", "--dataset", "cirr", "--root", str(root), "--counts", "none", "--no-progress"]
    assert main(common + ["--transform", "targetpad"] + (["--decode"] if decode else [])) == 1
    assert "too large (1)" in capsys.readouterr().out
    assert main(common + ["--transform", "none"]) == 0
