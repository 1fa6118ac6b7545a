"""README's "Reproduce the paper": one command per row of docs/method.md section 7, each a valid `cir-plugins recipe
run` line naming an existing recipe, and the example factories it names exist."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

from cir_plugins.cli import recipe as recipe_command
from cir_plugins.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[2]
SECTION = (ROOT / "README.md").read_text().split("## Reproduce the paper", 1)[1].split("\n## ", 1)[0]
ROWS = ["CLIP4Cir (the release's re-run)", "CLIP4Cir + SPN", "SPRC (BLIP-2)", "SPRC + SPN", "TG-CIR / + SPN",
        "BLIP4CIR / + SPN"]  # docs/method.md section 7, in order


def _table():
    rows = []
    for line in SECTION.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`cir-plugins"):
            rows.append((cells[0], cells[1].strip("`"), cells[2]))
    return rows


def test_one_line_per_published_row():
    assert [row for row, _, _ in _table()] == ROWS


def test_every_line_parses_and_names_a_recipe_whose_published_row_it_is():
    parser = argparse.ArgumentParser()
    recipe_command.configure(parser)
    for row, command, printed in _table():
        argv = shlex.split(command)
        assert argv[:3] == ["cir-plugins", "recipe", "run"], command
        args = parser.parse_args(argv[2:])
        recipe = load_recipe(args.name)
        assert recipe.published is not None and recipe.dataset == "cirr"
        assert recipe.model in row.lower().replace("-", "").replace(" (blip2)", ""), (row, recipe.model)
        assert printed in ("before", "after", "before / after")
        assert command == recipe_command.command_of(recipe)  # the line `cir-plugins recipe list` prints


def test_the_named_example_factories_exist():
    commands = [command for _, command, _ in _table()]
    commands += [recipe_command.command_of(load_recipe(n)) for n in ("zeroshot-cirr", "clip4cir-fashioniq")]
    for command in commands:
        spec = shlex.split(command)[shlex.split(command).index("--model") + 1]
        if spec.startswith("YOUR_"):
            continue
        target, function = spec.rsplit(":", 1)
        path = ROOT / target if target.endswith(".py") else ROOT / (target.replace(".", "/") + ".py")
        names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in names, spec
    assert re.search(r"--release", SECTION) and "as_release" in SECTION
