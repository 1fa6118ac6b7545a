"""cir_plugins.convert and ``cir-plugins convert``: torch.save checkpoints read weights-only (nothing in the
pickle runs), the one state dict found or named, written as safetensors atomically."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file

from cir_plugins.cli import main as cli_main
from cir_plugins.convert import read_torch_checkpoint, save_safetensors
from cir_plugins.errors import CheckpointError


def _state():
    return {"layer.weight": torch.randn(3, 2), "layer.bias": torch.randn(3), "scale": torch.tensor(100.0)}


def test_bare_and_nested_state_dicts(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"epoch": 3, "Combiner": state}, tmp_path / "nested.pt")  # CLIP4Cir's layout
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]}, "config": {"a": 1}},
               tmp_path / "lavis.pt")  # LAVIS's layout
    for name, key in (("bare.pt", None), ("nested.pt", None), ("nested.pt", "Combiner"), ("lavis.pt", None)):
        got = read_torch_checkpoint(tmp_path / name, key=key)
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state), name


def test_ambiguous_missing_and_code_pickles_are_clear_errors(tmp_path, capsys):
    torch.save({"CLIP": _state(), "Combiner": _state()}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="cannot tell which entry"):
        read_torch_checkpoint(tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="no entry 'clip'"):
        read_torch_checkpoint(tmp_path / "two.pt", key="clip")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_torch_checkpoint(tmp_path / "absent.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "code.pt", "wb") as handle:
        pickle.dump({"CLIP": Payload()}, handle)
    with pytest.raises(CheckpointError, match="weights only"):
        read_torch_checkpoint(tmp_path / "code.pt")
    assert "code ran" not in capsys.readouterr().out


def test_save_copies_shared_storage_and_the_command_line(tmp_path, capsys):
    base = torch.randn(4, 4)
    tied = {"a": base, "b": base, "row": base[1]}  # shared storage, which safetensors refuses as is
    save_safetensors(tied, tmp_path / "tied.safetensors", metadata={"k": "v"})
    back = load_file(tmp_path / "tied.safetensors")
    assert torch.equal(back["a"], base) and torch.equal(back["b"], base) and torch.equal(back["row"], base[1])
    assert not list(tmp_path.glob("*.tmp-*"))  # atomic: no temporary file left behind
    torch.save({"epoch": 1, "CLIP": _state()}, tmp_path / "clip.pt")
    assert cli_main(["convert", str(tmp_path / "clip.pt"), str(tmp_path / "clip.safetensors"), "--key", "CLIP"]) == 0
    assert "wrote 3 tensors" in capsys.readouterr().out
    assert torch.equal(load_file(tmp_path / "clip.safetensors")["layer.weight"],
                       read_torch_checkpoint(tmp_path / "clip.pt")["layer.weight"])
