"""setup.cfg installs what the library imports: the core's requirements are each imported by cir_plugins/,
every third-party import of cir_plugins/ is a requirement or an extra, and the README installs the extras the
quick-start commands need."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "faiss": "faiss-cpu", "open_clip": "open_clip_torch", "yaml": "pyyaml"}
# imported, yet no requirement of ours: (import name, why)
PROVIDED = {"triton": "ships with torch's Linux CUDA builds; fused.py imports it only when present"}


def _requirements(text: str) -> list[str]:
    return [re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower()
            for line in text.strip().splitlines() if line.strip() and not line.strip().startswith("#")]


def _config() -> tuple[list[str], dict[str, list[str]]]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = {name: _requirements(value) for name, value in config["options.extras_require"].items()}
    return _requirements(config["options"]["install_requires"]), extras


def _extra_closure(name: str) -> set[str]:
    """The distributions an extra installs, following its cir-plugins[other,...] references."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    out: set[str] = set()
    for line in config["options.extras_require"][name].strip().splitlines():
        own = re.fullmatch(r"\s*cir-plugins\[(.*)\]\s*", line)
        if own:
            for other in own.group(1).split(","):
                out |= _extra_closure(other.strip())
        elif line.strip():
            out |= set(_requirements(line))
    return out


def _third_party_imports() -> dict[str, set[str]]:
    """Import name -> files of cir_plugins/ that import it (absolute, non-stdlib, not the package itself)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "cir_plugins").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("cir_plugins", "__future__"):
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_core_requirements_are_what_the_library_imports():
    required, extras = _config()
    imports = _third_party_imports()
    imported = {DISTRIBUTION.get(name, name).lower() for name in imports}
    unused = [r for r in required if r not in imported]
    assert unused == [], f"install_requires names packages cir_plugins/ never imports: {unused}"
    optional = set().union(*extras.values())
    missing = {name: sorted(files) for name, files in imports.items()
               if name not in PROVIDED and DISTRIBUTION.get(name, name).lower() not in set(required) | optional}
    assert missing == {}, f"imported by cir_plugins/ but neither a requirement nor an extra: {missing}"


def test_the_library_extras_install_only_what_the_library_imports():
    _, extras = _config()
    imported = {DISTRIBUTION.get(name, name).lower() for name in _third_party_imports()}
    unused = {extra: [r for r in extras[extra] if r not in imported] for extra in ("report", "hub", "faiss", "serve")}
    assert not any(unused.values()), f"an extra installs packages cir_plugins/ never imports: {unused}"


def test_examples_and_test_extras_cover_what_they_import():
    examples, test = _extra_closure("examples"), _extra_closure("test")
    assert {"matplotlib", "tokenizers"} <= examples and "timm" in _extra_closure("timm")
    assert examples <= test and {"pytest", "hypothesis", "huggingface_hub", "timm"} <= test


def test_readme_quick_start_installs_the_extras():
    quick = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]
    assert blocks[0].startswith('pip install -e ".[examples]"') and "examples/quickstart.py" in blocks[0]
    assert blocks[1].startswith('pip install -e ".[test]"')
