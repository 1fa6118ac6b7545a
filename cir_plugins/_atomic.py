"""The package's one atomic file writer (private): banks, checkpoints, annotations, submissions, the world.

A write goes to ``path.tmp-<pid>`` beside ``path``, is fsynced, then ``os.replace``d over it and the folder
fsynced: a kill at any moment leaves the old file or the new one, never a torn one. :func:`atomic_write_files`
replaces several files together (all or none); :func:`folder_writer` writes a whole folder under a temporary
name (``.name.tmp-<pid>``) and swaps it into place (:func:`replace_folder`). What killed writes leave is cleaned
by the next write to the same place (:func:`remove_leftovers`). A path that is an existing folder is refused
before anything is written, and the folders a failed write created are removed again while empty.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_files", "atomic_write_json", "check_writable", "folder_writer",
           "fsync_dir", "fsync_file", "remove_leftovers", "replace_folder"]

_LEFTOVER = re.compile(r"\.(tmp|old)-(\d+)$")  # what a write of this module names its temporary files and folders


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to disk (a file another writer, e.g. safetensors' save_file, wrote)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a folder's entries (a rename into it); skipped where a folder cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, make_parents: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and return the path; ``make_parents`` creates missing folders first
    (else a missing folder is the OSError it is). A failed write leaves ``path`` as it was."""
    return atomic_write_files({path: data}, make_parents=make_parents)[0]


def _refuse_folder(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))


def _make_parents(paths: list[Path]) -> list[Path]:
    """Create the missing folders above ``paths``; returns those created, deepest first (for :func:`_remove_empty`)."""
    created: list[Path] = []
    try:
        for path in paths:
            for folder in reversed(list(itertools.takewhile(lambda f: not f.exists(), path.parents))):
                with contextlib.suppress(FileExistsError):  # made meanwhile by another writer: not ours to remove
                    folder.mkdir()
                    created.insert(0, folder)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write created (deepest first), each only while it is still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in ``path.tmp-<pid>``, fsynced (the caller has refused a folder at ``path``); removes killed writes'
    leftovers."""
    remove_leftovers(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):  # name the file being written, not its temporary name
            raise type(error)(error.errno, error.strerror, str(path)) from error
        raise
    return tmp


def atomic_write_files(files: Mapping[str | os.PathLike, bytes], *, make_parents: bool = False) -> list[Path]:
    """Write several files that belong together (a report's page, picture and data): all are written and
    fsynced under their temporary names before any is renamed into place, so a failure while writing (a full
    disk, a folder in the way) leaves every old file as it was. Returns the paths."""
    paths = [Path(p) for p in files]
    for path in paths:  # refuse before writing anything
        _refuse_folder(path)
    created = _make_parents(paths) if make_parents else []
    written: list[Path] = []
    try:
        for path, data in zip(paths, files.values()):
            written.append(_write_temporary(path, data))
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    try:
        for tmp, path in zip(written, paths):
            os.replace(tmp, path)
    finally:
        for tmp in written:
            tmp.unlink(missing_ok=True)
    for folder in dict.fromkeys(path.parent for path in paths):
        fsync_dir(folder)
    return paths


def check_writable(path: str | os.PathLike) -> Path:
    """Find out now, before a long computation, whether a file can be written at ``path`` later: an OSError
    naming ``path`` (a folder in the way, a file where a folder is needed, a read-only folder) when not. Probes
    the nearest existing folder with a temporary file of the writer's own name, removed at once. Returns ``path``."""
    path = Path(path)
    _refuse_folder(path)
    folder = next((f for f in path.parents if f.exists()), path.parents[-1])
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is a file, not a folder", str(path))
    probe = folder / f"{path.name}.tmp-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return path
    except OSError as error:
        raise type(error)(error.errno, error.strerror, str(path)) from error
    probe.unlink(missing_ok=True)
    return path


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (this one does; a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as someone else
        pass
    return True


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writes to ``path`` left beside it, for processes that no longer run: files
    ``name.tmp-<pid>``, folders ``.name.tmp-<pid>``; a ``.name.old-<pid>`` folder (set aside by
    :func:`replace_folder`) is put back at ``path`` when ``path`` is missing, else removed. Returns what was
    removed; what cannot be removed is left."""
    path = Path(path)
    removed: list[Path] = []
    try:
        siblings = sorted(path.parent.iterdir())
    except OSError:  # a missing or unreadable folder holds no leftovers we could remove
        return removed
    for entry in siblings:
        match = _LEFTOVER.search(entry.name)
        if match is None or _running(int(match.group(2))):
            continue
        stem, kind = entry.name[: match.start()], match.group(1)
        if kind == "tmp" and stem == path.name and not entry.is_dir():
            entry.unlink(missing_ok=True)
        elif stem == f".{path.name}" and entry.is_dir() and not entry.is_symlink():
            if kind == "old" and not path.exists():
                os.replace(entry, path)  # killed between replace_folder's two renames: the old folder comes back
                continue
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        removed.append(entry)
    return removed


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = None, ensure_ascii: bool = True,
                      trailing_newline: bool = False, make_parents: bool = False) -> Path:
    """Write ``json.dumps(data, indent=indent, ensure_ascii=ensure_ascii)`` (plus a final newline when asked) as
    UTF-8, atomically; ``make_parents`` creates the missing folders first."""
    text = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + ("\n" if trailing_newline else "")
    return atomic_write_bytes(path, text.encode("utf-8"), make_parents=make_parents)


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike, aside: str | os.PathLike) -> Path | None:
    """Swap the finished folder ``tmp`` into ``final`` by rename, an existing ``final`` first renamed to ``aside``
    (returned then, for the caller to remove once nothing can need it; else None). Both renames are fsynced:
    after a kill either the old folder (at ``final`` or ``aside``) or the new one is whole."""
    tmp, final, aside = Path(tmp), Path(final), Path(aside)
    fsync_dir(tmp)
    moved = aside if final.exists() else None
    if moved is not None:
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return moved


@contextlib.contextmanager
def folder_writer(final: str | os.PathLike) -> Iterator[Path]:
    """``with folder_writer(final) as tmp:`` write the files into ``tmp`` (``.name.tmp-<pid>`` beside ``final``);
    a block that ends without an error replaces ``final`` (the old one removed), one that raises leaves it."""
    final = Path(final)
    created = _make_parents([final])
    remove_leftovers(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield tmp
        old = replace_folder(tmp, final, final.with_name(f".{final.name}.old-{os.getpid()}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)  # nor the folders made for it
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
