"""Loading one factory never hands back another's module of the same name: a factory file's folder left on the
path is not searched for a later ``module:function`` spec, and a same-named module imported earlier from another
working directory or factory folder is loaded afresh from where the path names it now."""

from __future__ import annotations

import sys

import pytest

from cir_plugins import _loading
from cir_plugins._loading import load_factory
from cir_plugins.errors import ConfigError

NAMES = ("stale_check_factory", "stale_check_sibling", "stale_check_module")


@pytest.fixture(autouse=True)
def clean_imports(monkeypatch):
    """Each test starts and ends without the modules and path entries it makes."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(_loading, "_FACTORY_FOLDERS", [])
    yield
    for name in NAMES:
        sys.modules.pop(name, None)


def _folder(root, name, files):
    folder = root / name
    folder.mkdir()
    for file, text in files.items():
        (folder / file).write_text(text)
    return folder


def test_a_module_spec_does_not_find_a_factory_file_loaded_from_another_folder(tmp_path, monkeypatch):
    models = _folder(tmp_path, "models", {"stale_check_factory.py": "def build():\n    return 1\n"})
    assert load_factory(f"{models / 'stale_check_factory.py'}:build")() == 1
    monkeypatch.chdir(_folder(tmp_path, "elsewhere", {}))
    with pytest.raises(ConfigError, match="no module named 'stale_check_factory'"):
        load_factory("stale_check_factory:build")
    assert str(models) in sys.path  # still there for the loaded factory's own later imports


def test_factory_files_in_two_folders_get_their_own_sibling_of_the_same_name(tmp_path):
    factory = "import stale_check_sibling\n\ndef build():\n    return stale_check_sibling.VALUE\n"
    first = _folder(tmp_path, "first", {"f.py": factory, "stale_check_sibling.py": "VALUE = 1\n"})
    second = _folder(tmp_path, "second", {"f.py": factory, "stale_check_sibling.py": "VALUE = 2\n"})
    build_first = load_factory(f"{first / 'f.py'}:build")
    assert load_factory(f"{second / 'f.py'}:build")() == 2
    assert build_first() == 1  # the first factory keeps the module it imported


def test_a_module_spec_in_another_working_directory_loads_that_directory_s_module(tmp_path, monkeypatch):
    for value in (1, 2):
        monkeypatch.chdir(_folder(tmp_path, f"run{value}", {"stale_check_module.py":
                                                             f"def build():\n    return {value}\n"}))
        assert load_factory("stale_check_module:build")() == value
