"""The small shared helpers behind the commands: JSON-object options and the atomic JSON writer."""

from __future__ import annotations

import argparse
import json

import pytest

from cir_plugins._atomic import atomic_write_json
from cir_plugins.cli._common import add_factory_arguments, model_from_factory, parse_json_object
from cir_plugins.errors import ConfigError


def test_parse_json_object_accepts_objects_and_names_the_option_otherwise():
    assert parse_json_object('{"dim": 5, "name": "x"}', "--opt", fix="f") == {"dim": 5, "name": "x"}
    with pytest.raises(ConfigError, match=r"--opt is not valid JSON") as bad:
        parse_json_object("{dim: 5}", "--opt", fix="pass an object")
    assert "{dim: 5}" in str(bad.value) and "pass an object" in str(bad.value)
    with pytest.raises(ConfigError, match=r"--opt must be a JSON object"):
        parse_json_object("[1, 2]", "--opt", fix="f")


def test_model_from_factory_passes_the_json_keyword_arguments(tmp_path):
    (tmp_path / "factory.py").write_text("def build(dim=1, name='a'):\n    return ('model', dim, name)\n")
    parser = argparse.ArgumentParser()
    add_factory_arguments(parser)
    args = parser.parse_args(["--model", f"{tmp_path / 'factory.py'}:build", "--factory-kwargs", '{"dim": 7}'])
    assert model_from_factory(args) == ("model", 7, "a")
    args = parser.parse_args(["--model", f"{tmp_path / 'factory.py'}:build", "--factory-kwargs", '"7"'])
    with pytest.raises(ConfigError, match="--factory-kwargs must be a JSON object"):
        model_from_factory(args)


@pytest.mark.parametrize("indent", [None, 1])
def test_atomic_write_json_bytes_match_json_dumps_and_leave_no_temp_file(tmp_path, indent):
    data = {"b": [1, 2.5, None], "a": {"é": "ü"}, "n": 3}
    path = tmp_path / "deep" / "er" / "out.json"
    with pytest.raises(FileNotFoundError):
        atomic_write_json(path, data, indent=indent)  # the folder is not made unless asked
    atomic_write_json(path, data, indent=indent, make_parents=True)
    assert path.read_bytes() == json.dumps(data, indent=indent).encode("utf-8")
    atomic_write_json(path, {"replaced": True}, indent=indent)
    assert json.loads(path.read_text()) == {"replaced": True}
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]
