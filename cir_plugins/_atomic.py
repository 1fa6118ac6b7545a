"""The package's one atomic file writer (private): banks, checkpoints, annotations, submissions, the world.

A write goes to ``path.tmp-<pid>`` in the same folder, is flushed and fsynced, then ``os.replace``d
over ``path`` and the folder fsynced, so a kill at any moment leaves the old file or the new one,
never a torn one. :func:`atomic_write_json` is the same write for a JSON document; :func:`replace_folder`
swaps a whole folder written under a temporary name into place (training checkpoints, shared results).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "fsync_dir", "fsync_file", "replace_folder"]


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to disk (a file another writer, e.g. safetensors' save_file, wrote)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a folder's entries (a rename into it). Filesystems that cannot open a folder are skipped:
    the rename itself is still atomic there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, make_parents: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see the module doc) and return the path.

    ``make_parents``: create missing folders first (else a missing folder is the OSError it is). A
    failed write removes its temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = None, ensure_ascii: bool = True,
                      trailing_newline: bool = False, make_parents: bool = False) -> Path:
    """Write ``data`` as UTF-8 JSON (the bytes of ``json.dumps(data, indent=indent, ensure_ascii=...)``, plus a
    final newline when asked) atomically. ``make_parents`` creates the missing folders first."""
    text = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + ("\n" if trailing_newline else "")
    return atomic_write_bytes(path, text.encode("utf-8"), make_parents=make_parents)


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike, aside: str | os.PathLike) -> Path | None:
    """Swap the finished folder ``tmp`` into ``final`` by rename; an existing ``final`` is first renamed to
    ``aside``. Returns ``aside`` when it now holds the previous folder (the caller removes it once nothing
    can need it), else None. ``tmp``'s entries and both renames are fsynced, so after a kill either the old
    folder (at ``final`` or ``aside``) or the new one is whole."""
    tmp, final, aside = Path(tmp), Path(final), Path(aside)
    fsync_dir(tmp)
    moved = None
    if final.exists():
        os.replace(final, aside)
        moved = aside
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return moved
