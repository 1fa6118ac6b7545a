"""The documents the repository cites are in the repository: no file points at notes outside it, and every
"docs/method.md section N" names a section that docs/method.md has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# spelled in pieces so that this file does not cite them itself
OUTSIDE = ("../" + "shared", "METHOD" + ".md", "ARCHITECTURE" + ".md")


def _files() -> list[Path]:
    """The repository's files: git's list (tracked and not ignored), or, outside a git checkout (an unpacked
    archive), every file but hidden folders, caches and build output."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        skip = re.compile(r"(^|/)(\.[^/]*|__pycache__|[^/]*\.egg-info|build|dist)(/|$)")
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip.search(p.relative_to(ROOT).as_posix())]
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:4096]:
        return None  # binary (images, weights)
    return data.decode("utf-8", errors="replace")


def test_no_file_cites_a_document_outside_the_repository():
    cited = [f"{path.relative_to(ROOT)}: {word}" for path in _files() if (text := _text(path)) is not None
             for word in OUTSIDE if word in text]
    assert cited == []


def test_every_cited_section_of_the_method_notes_exists():
    notes = (ROOT / "docs" / "method.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", notes, flags=re.M)}
    assert sections == set(range(1, 9))
    cites = [(path.relative_to(ROOT), int(n)) for path in _files() if (text := _text(path)) is not None
             for n in re.findall(r"docs/method\.md(?:'s)?,? sections? (\d+)", text)]
    assert cites and all(n in sections for _, n in cites), [c for c in cites if c[1] not in sections]
