"""Smaller file surfaces: `recipe show` on a file that is not UTF-8 or nested too deeply, and a recipe's
negative rank window, are one clear error line."""

from __future__ import annotations

import json

import pytest

from cir_plugins.cli import main
from cir_plugins.recipes import RECIPE_DIR, list_recipes


@pytest.mark.parametrize("content, message", [(b'{"name": "\xff\xfe"}', "not UTF-8 text"),
                                              (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")])
def test_recipe_show_on_a_file_that_is_not_a_json_recipe(tmp_path, capsys, content, message):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    assert main(["recipe", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cir-plugins recipe: error:") and message in err and err.count("\n") == 1


def test_a_negative_rank_window_says_what_it_means_and_what_to_write(tmp_path, capsys):
    name = list_recipes()[0]
    recipe = json.loads((RECIPE_DIR / f"{name}.json").read_text())
    recipe["name"] = "window"
    recipe["generation"]["rank_window"] = [-0.5, 0.5]
    (tmp_path / "window.json").write_text(json.dumps(recipe))
    assert main(["recipe", "show", str(tmp_path / "window.json")]) == 2
    err = capsys.readouterr().err
    assert "[-0.5, 0.5]" in err and "starts below 0" in err and "0 <= a < b" in err and "[0.2, 0.3]" in err
