"""The small shared helpers behind the commands: JSON-object options and the atomic JSON writer."""

from __future__ import annotations

import argparse
import json

import pytest

from cir_plugins._atomic import atomic_write_json
from cir_plugins.cli._common import (
    add_factory_arguments,
    model_from_factory,
    parse_json_object,
    read_groups,
    read_json_file,
)
from cir_plugins.errors import ConfigError, DataError


def test_parse_json_object_accepts_objects_and_names_the_option_otherwise():
    assert parse_json_object('{"dim": 5, "name": "x"}', "--opt", fix="f") == {"dim": 5, "name": "x"}
    with pytest.raises(ConfigError, match=r"--opt is not valid JSON") as bad:
        parse_json_object("{dim: 5}", "--opt", fix="pass an object")
    assert "{dim: 5}" in str(bad.value) and "pass an object" in str(bad.value)
    with pytest.raises(ConfigError, match=r"--opt must be a JSON object"):
        parse_json_object("[1, 2]", "--opt", fix="f")


def test_read_json_file_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2]}')
    assert read_json_file(path, "the x file") == {"a": [1, 2]}
    with pytest.raises(DataError, match=r"cannot read the x file") as missing:
        read_json_file(tmp_path / "none.json", "the x file")
    assert "none.json" in str(missing.value)
    path.write_text("{a: 1")
    with pytest.raises(ConfigError, match=r"cannot read the x file.*x\.json") as bad:
        read_json_file(path, "the x file", error=ConfigError, fix="write it again")
    assert "write it again" in str(bad.value)
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"the x file must hold a JSON object"):
        read_json_file(path, "the x file")
    path.write_text('"text"')
    with pytest.raises(DataError, match=r"must hold a JSON object"):
        read_json_file(path, "the x file")


def test_read_groups_reads_a_groups_file_and_refuses_non_string_groups(tmp_path):
    path = tmp_path / "groups.json"
    args = argparse.Namespace(dedup=False, no_dedup=False, groups=str(path))
    path.write_text(json.dumps({"a": "g0", "b": "g0"}))
    assert read_groups(args, split=None, show_progress=False) == {"a": "g0", "b": "g0"}
    path.write_text(json.dumps({"a": "g0", "b": 3}))
    with pytest.raises(DataError, match=r"groups file must be a JSON object of strings.*'b', 3"):
        read_groups(args, split=None, show_progress=False)
    path.write_text(json.dumps(["a", "b"]))
    with pytest.raises(DataError, match=r"the groups file must hold a JSON object"):
        read_groups(args, split=None, show_progress=False)


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


def test_check_data_counts_option_reads_official_none_or_a_json_object(tmp_path):
    from cir_plugins.cli.check_data import _counts

    assert _counts("official") == "official" and _counts("none") is None
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"val": {"images": 4, "triplets": 2}}))
    assert _counts(str(path)) == {"val": {"images": 4, "triplets": 2}}
    with pytest.raises(ConfigError, match=r"cannot read the --counts file.*official"):
        _counts(str(tmp_path / "missing.json"))
    path.write_text("[]")
    with pytest.raises(ConfigError, match=r"the --counts file must hold a JSON object"):
        _counts(str(path))
