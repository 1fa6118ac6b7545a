"""cir-plugins convert on inputs that used to give a raw traceback, an unreadable file or a lost source:
each is one error line (exit 2) and nothing is written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cir_plugins.cli import main
from cir_plugins.convert import save_safetensors
from cir_plugins.errors import CheckpointError


def _convert(capsys, *argv) -> tuple[int, str]:
    code = main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    return code, err


def test_a_tensor_named_like_the_safetensors_header_is_refused(tmp_path, capsys):
    torch.save({"__metadata__": torch.zeros(2), "w": torch.ones(2)}, tmp_path / "a.pt")
    code, err = _convert(capsys, tmp_path / "a.pt", tmp_path / "a.safetensors")
    assert code == 2 and "'__metadata__'" in err and "rename" in err
    assert not (tmp_path / "a.safetensors").exists()  # before: exit 0 and a file safetensors cannot load
    with pytest.raises(CheckpointError, match="__metadata__"):
        save_safetensors({"__metadata__": torch.zeros(1)}, tmp_path / "b.safetensors")


def test_converting_a_file_onto_itself_keeps_the_source(tmp_path, capsys):
    source = tmp_path / "g2.pt"
    torch.save({"w": torch.ones(2)}, source)
    before = source.read_bytes()
    code, err = _convert(capsys, source, tmp_path / "." / "g2.pt")
    assert code == 2 and "overwrite the input" in err and "g2.safetensors" in err
    assert source.read_bytes() == before


@pytest.mark.parametrize("kind", ["empty", "sparse", "meta"])
def test_empty_sparse_and_meta_inputs_are_one_line(tmp_path, capsys, kind):
    source = tmp_path / f"{kind}.pt"
    if kind == "empty":
        source.write_bytes(b"")
    else:
        tensor = torch.ones(3, 3).to_sparse() if kind == "sparse" else torch.empty(3, device="meta")
        torch.save({"w": tensor}, source)
    code, err = _convert(capsys, source, tmp_path / "out.safetensors")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert {"empty": "empty (0 bytes)", "sparse": "dense tensors only", "meta": "'meta' device"}[kind] in err
    assert not (tmp_path / "out.safetensors").exists()


def test_an_output_path_that_is_a_folder_is_one_line(tmp_path, capsys):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    (tmp_path / "out").mkdir()
    code, err = _convert(capsys, tmp_path / "ok.pt", tmp_path / "out")
    assert code == 2 and "is a folder" in err and str(tmp_path / "out") in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt", "out"]
    assert main(["convert", str(tmp_path / "ok.pt"), str(tmp_path / "ok.safetensors")]) == 0
    assert torch.equal(load_file(tmp_path / "ok.safetensors")["w"], torch.ones(2))
