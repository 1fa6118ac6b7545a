import dataclasses
import importlib

import pytest

import cir_plugins as cp
from cir_plugins.errors import CIRPluginsError, ConfigError, DataError, explain


def test_every_public_name_resolves():
    assert cp.__all__ == sorted(cp.__all__)
    for name in cp.__all__:
        assert getattr(cp, name) is not None, name


def test_unknown_attribute_is_attribute_error():
    with pytest.raises(AttributeError):
        cp.no_such_name  # noqa: B018


def test_errors_subclass_builtins_and_explain():
    message = explain("temperature must be positive", got=-1.0, expected=0.0, fix="pass 0.02")
    assert message == "temperature must be positive; got -1.0; expected 0.0. Fix: pass 0.02."
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, CIRPluginsError)


def test_triplet_validates_and_is_immutable():
    t = cp.Triplet("a", ["make it red"], "b", members=["a", "b"], meta={"target_soft": {"b": 1.0}})
    assert t.texts == ("make it red",) and t.text == "make it red" and t.members == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.reference = "c"
    with pytest.raises(TypeError):
        t.meta["x"] = 1
    with pytest.raises(DataError, match="empty"):
        cp.Triplet("a", ["  "], "b")
    with pytest.raises(DataError, match="source"):
        cp.Triplet("a", ["x"], "b", source="made-up")
    assert cp.Triplet("a", "one text", None).texts == ("one text",)


def test_cli_lists_every_command(capsys):
    cli = importlib.import_module("cir_plugins.cli")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_only_the_cli_package_imports_argparse():
    """The library never parses argv: argparse is imported under cir_plugins/cli/ alone."""
    import ast
    from pathlib import Path

    package = Path(cp.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "argparse" for n in names):
                offenders.append(str(path.relative_to(package)))
    assert offenders == []
    assert sorted(cli_module for cli_module, _ in importlib.import_module("cir_plugins.cli").COMMANDS.values()
                  if not cli_module.startswith("cir_plugins.cli.")) == []
