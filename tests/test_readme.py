"""The README's promises: the two quick-start commands, CI running the same test command, the snippet's names."""

import re
from pathlib import Path

import cir_plugins as cp

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks(text):
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_quick_start_is_two_commands():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = bash_blocks(quick)
    assert len(blocks) == 2, blocks
    assert "examples/quickstart.py" in blocks[0] and (ROOT / "examples" / "quickstart.py").is_file()
    assert "pytest" in blocks[1]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = bash_blocks(README.split("## Quick start", 1)[1])[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), (test_command, ci)


def test_snippet_names_exist():
    snippet = (
        README.split("## Use the loss in your own training loop", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    )
    for name in set(re.findall(r"cp\.(\w+)", snippet)):
        assert hasattr(cp, name), name
    assert len(snippet.strip().splitlines()) <= 7


def test_every_cp_name_in_the_readme_exists_and_the_api_table_is_the_public_contract():
    for name in set(re.findall(r"\bcp\.(\w+)", README)):
        assert name in cp.__all__, name
    api = README.split("## API", 1)[1].split("\n## ", 1)[0]
    first_column = [line.split("|")[1] for line in api.splitlines() if line.startswith("| `")]
    listed = {name for cell in first_column for name in re.findall(r"\bcp\.(\w+)", cell)}
    assert listed == set(cp.__all__)
    assert len(cp.__all__) == len(set(cp.__all__)) == 29  # the contract in the architecture notes
