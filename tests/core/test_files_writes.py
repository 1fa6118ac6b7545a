"""Writes that fail (a full disk, a folder in the way) are one line naming the path and the cause, exit 2, and
leave nothing partial; what killed writes left is cleaned by the next write to the same place; show's three
files are replaced together or not at all."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch
from _toy import factory_source
from safetensors.torch import save_file
from test_report import _random_features

from cir_plugins import _atomic
from cir_plugins._atomic import atomic_write_bytes, atomic_write_files, folder_writer, remove_leftovers
from cir_plugins.cli import main
from cir_plugins.data.fixtures import build_cirr_tree
from cir_plugins.data.split import Split
from cir_plugins.errors import ConfigError
from cir_plugins.report import retrieval_report


def _dead_pid() -> int:
    """The id of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


class _FullHandle:
    """A file opened for writing on a full disk: the open works, the write fails."""

    def __init__(self, handle, path):
        self.handle, self.path = handle, path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    def __getattr__(self, name):
        return getattr(self.handle, name)


def _fill_disk(monkeypatch) -> None:
    """From now on every file the package's one writer opens for writing runs out of space."""
    real = open

    def fake(path, mode="r", *args, **kwargs):
        handle = real(path, mode, *args, **kwargs)
        return _FullHandle(handle, path) if "w" in mode else handle

    monkeypatch.setattr(_atomic, "open", fake, raising=False)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def test_a_full_disk_is_one_line_for_every_writing_command(tmp_path, monkeypatch, capsys):
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    save_file({"weight": torch.ones(2, 2)}, tmp_path / "w.safetensors")
    root = build_cirr_tree(tmp_path / "data", splits=("val",))
    (tmp_path / "old.json").write_text("old")
    factory = tmp_path / "factory.py"
    factory.write_text(factory_source())
    data = ["--model", f"{factory}:build", "--dataset", "cirr", "--root", str(root), "--split", "val",
            "--image-size", "4", "--no-progress"]
    _fill_disk(monkeypatch)
    commands = {
        "build-bank": (["build-bank", *data, "--no-dedup", "--out", str(tmp_path / "bank.safetensors")],
                       tmp_path / "bank.safetensors"),
        "show": (["show", *data, "--k", "2", "--queries", "1", "--out", str(tmp_path / "show")],
                 tmp_path / "show" / "report.png"),
        "convert": (["convert", str(tmp_path / "a.pt"), str(tmp_path / "a.safetensors")], tmp_path / "a.safetensors"),
        "check-data": (["check-data", "--dataset", "cirr", "--root", str(root), "--splits", "val", "--counts", "none",
                        "--report", str(tmp_path / "old.json")], tmp_path / "old.json"),
        "share": (["share", "--trained", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "shared")],
                  tmp_path / "shared"),
    }
    for name, (argv, target) in commands.items():
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, name
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"cir-plugins {name}: error: cannot use") and "No space left on device" in line
        assert str(target.name) in line and "free some space" in line and "Traceback" not in err
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "shared").exists()
    assert not (tmp_path / "bank.safetensors").exists() and not (tmp_path / "show").exists()  # not even its folder
    assert (tmp_path / "old.json").read_text() == "old"  # the old report is kept whole
    assert _leftovers(tmp_path) == []  # no temporary file or folder left behind


def test_killed_writes_are_cleaned_by_the_next_write_to_the_same_place(tmp_path):
    dead = _dead_pid()
    target = tmp_path / "bank.safetensors"
    (tmp_path / f"bank.safetensors.tmp-{dead}").write_bytes(b"torn")
    (tmp_path / f"other.json.tmp-{dead}").write_bytes(b"another file's")
    (tmp_path / f"bank.safetensors.tmp-{1}").write_bytes(b"a running process's (pid 1)")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors", "bank.safetensors.tmp-1",
                                                            f"other.json.tmp-{dead}"]
    shared = tmp_path / "shared"
    weights = tmp_path / f".shared.tmp-{dead}"
    weights.mkdir()
    (weights / "weights.safetensors").write_bytes(b"x" * 1000)  # a killed share's full weights
    with folder_writer(shared) as tmp:
        (tmp / "a").write_text("1")
    assert not weights.exists() and (shared / "a").read_text() == "1"


def test_a_folder_set_aside_by_a_killed_swap_comes_back(tmp_path):
    dead = _dead_pid()
    final = tmp_path / "shared"
    aside = tmp_path / f".shared.old-{dead}"
    aside.mkdir()
    (aside / "a").write_text("old")  # killed between the two renames: only the old folder, set aside
    assert remove_leftovers(final) == []
    assert (final / "a").read_text() == "old" and not aside.exists()
    with pytest.raises(RuntimeError), folder_writer(final) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("the write fails")
    assert (final / "a").read_text() == "old" and _leftovers(tmp_path) == []


def test_files_written_together_are_all_kept_when_one_cannot_be_written(tmp_path, monkeypatch):
    (tmp_path / "a").write_text("old a")
    (tmp_path / "b").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_files({tmp_path / "a": b"new a", tmp_path / "b": b"new b"})
    assert (tmp_path / "a").read_text() == "old a"
    _fill_disk(monkeypatch)
    with pytest.raises(OSError) as caught:
        atomic_write_files({tmp_path / "a": b"new a", tmp_path / "c": b"new c"})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "a")
    assert (tmp_path / "a").read_text() == "old a" and not (tmp_path / "c").exists() and _leftovers(tmp_path) == []


def _report(out):
    features = _random_features(seed=1)
    images = {image_id: torch.full((3, 8, 8), float(i)) for i, image_id in enumerate(features.gallery_ids)}
    split = Split(dataset="synthetic", split="test", triplets=features.triplets, gallery_ids=features.gallery_ids,
                  images=images, protocol="cirr")
    return retrieval_report(None, split, out, features=features, k=3, n_queries=2)


def test_a_failed_write_removes_the_folders_it_made(tmp_path, monkeypatch):
    (tmp_path / "kept").mkdir()
    _fill_disk(monkeypatch)
    writes = {"one file": lambda: atomic_write_bytes(tmp_path / "kept" / "new" / "deeper" / "a", b"a"),
              "files together": lambda: atomic_write_files({tmp_path / "kept" / "new" / "a": b"a",
                                                            tmp_path / "kept" / "other" / "b": b"b"},
                                                           make_parents=True)}
    for name, write in writes.items():
        with pytest.raises(OSError) as caught:
            write()
        assert caught.value.errno == errno.ENOSPC, name
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"], name  # the folder that was there stays
    with pytest.raises(OSError):
        with folder_writer(tmp_path / "kept" / "new" / "folder") as tmp:
            atomic_write_bytes(tmp / "a", b"a")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]


def test_show_output_collisions_change_nothing(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match="report folder is a file"):
        _report(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    out = tmp_path / "show"
    first = _report(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    first.html.unlink()
    first.html.mkdir()  # report.html is a folder: nothing may be replaced, report.png included
    (out / "report.png").write_bytes(b"old png")
    with pytest.raises(IsADirectoryError) as caught:
        _report(out)
    assert caught.value.filename == str(out / "report.html")
    assert (out / "report.png").read_bytes() == b"old png"
    assert (out / "report.json").read_bytes() == before["report.json"] and _leftovers(tmp_path) == []
    record = json.loads((out / "report.json").read_text())
    assert record["summary"]["k"] == 3


def test_build_bank_refuses_an_unwritable_out_before_encoding(tmp_path, capsys):
    root = build_cirr_tree(tmp_path / "data", splits=("val",))
    calls = tmp_path / "factory_called"
    factory = tmp_path / "factory.py"
    factory.write_text(factory_source("import pathlib", f"pathlib.Path({str(calls)!r}).write_text('called')"))
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    common = ["build-bank", "--model", f"{factory}:build", "--dataset", "cirr", "--root", str(root), "--split", "val",
              "--image-size", "4", "--no-progress", "--no-dedup", "--out"]
    for out, cause in ((tmp_path / "a_file" / "bank.safetensors", "is a file, not a folder"),
                       (tmp_path / "a_folder", "is a folder, not a file")):
        assert main(common + [str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cir-plugins build-bank: error: cannot use") and cause in err and str(out) in err
        assert not calls.exists()  # refused before the model was even built, let alone the gallery encoded
    assert main(common + [str(tmp_path / "new" / "bank.safetensors")]) == 0 and calls.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("code, cause, fix", [(errno.EACCES, "Permission denied", "writable"),
                                              (errno.EROFS, "Read-only file system", "mounted read-only")])
def test_a_read_only_output_folder_is_one_line_naming_the_path_and_cause(tmp_path, monkeypatch, capsys, code, cause,
                                                                          fix):
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    real = open

    def refuse(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(code, cause, str(path))
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(_atomic, "open", refuse, raising=False)
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "out" / "a.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err == (f"cir-plugins convert: error: cannot use '{tmp_path / 'out' / 'a.safetensors'}': {cause}. "
                   f"Fix: {err.split('Fix: ')[1]}") and fix in err and err.count("\n") == 1
    assert _leftovers(tmp_path) == []
