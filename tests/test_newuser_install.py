"""A CPU install stays CPU-only: the README installs torch and torchvision together from PyTorch's CPU index, and
what `pip install -e ".[examples]"` pulls on top of that (the core requirements and the examples extra, followed
through the installed packages' declared requirements, torch's own left to the build chosen) needs neither
torchvision nor any CUDA package. Checked from the packages' metadata, offline; timm, which needs torchvision, is
its own extra."""

from __future__ import annotations

import configparser
import re
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
CUDA_ONLY = re.compile(r"^(torchvision|torchaudio|triton|nvidia-.*|cuda-.*|cupy.*)$")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _extra(name: str) -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [x.strip() for x in config["options.extras_require"][name].strip().splitlines() if x.strip()]
    out = []
    for line in lines:
        own = re.fullmatch(r"cir-plugins\[(.*)\]", line)
        out += [r for other in own.group(1).split(",") for r in _extra(other.strip())] if own else [Requirement(line)]
    return out


def _core() -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return [Requirement(x.strip()) for x in config["options"]["install_requires"].strip().splitlines()
            if x.strip() and not x.strip().startswith("#")]


def _closure(roots: list[Requirement]) -> tuple[dict[str, str], set[str]]:
    """Distribution -> who asked for it, following declared requirements (no extras of theirs, markers for this
    platform); torch is not followed (the CPU build has no CUDA requirement). Also the names not installed here."""
    seen: dict[str, str] = {}
    missing: set[str] = set()
    todo = [(r, "cir-plugins") for r in roots]
    while todo:
        requirement, parent = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = _name(requirement.name)
        if name in seen:
            continue
        seen[name] = parent
        if name == "torch":
            continue
        try:
            declared = requires(requirement.name) or []
        except PackageNotFoundError:
            missing.add(name)
            continue
        todo += [(Requirement(text), name) for text in declared]
    return seen, missing


def test_the_examples_extra_needs_no_torchvision_and_nothing_cuda():
    found, missing = _closure(_core() + _extra("examples"))
    assert {"torch", "transformers", "matplotlib", "tokenizers"} <= set(found) and not {
        "torch",
        "transformers",
    } & missing
    cuda = {name: parent for name, parent in found.items() if CUDA_ONLY.match(name)}
    assert cuda == {}, f"pulled in by the examples extra (name: required by): {cuda}"
    assert "timm" not in found


def test_torchvision_comes_only_with_the_extras_that_need_it():
    found, _ = _closure(_extra("timm"))
    assert found.get("torchvision") == "timm"  # so the README installs it from the CPU index, beside torch


def test_readme_installs_torch_and_torchvision_together_from_the_cpu_index():
    quick = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    text = " ".join(quick.split())
    assert f"pip install torch torchvision {CPU_INDEX}" in text
    assert text.index(CPU_INDEX) > text.index('pip install -e ".[examples]"')  # the paragraph after the commands
    assert "then the commands above" in text
