"""The package's one atomic file writer (private): banks, checkpoints, annotations, submissions, the world.

A write goes to ``path.tmp-<pid>`` in the same folder, is flushed and fsynced, then ``os.replace``d
over ``path`` and the folder fsynced, so a kill at any moment leaves the old file or the new one,
never a torn one. :func:`atomic_write_json` is the same write for a JSON document; :func:`atomic_write_files`
writes several files that belong together (all replaced, or none); :func:`replace_folder` swaps a whole folder
written under a temporary name into place (training checkpoints), and :func:`folder_writer` is the whole
write of such a folder (``.name.tmp-<pid>``, removed again when the write fails).

What a killed write leaves (``name.tmp-<pid>`` files, ``.name.tmp-<pid>`` / ``.name.old-<pid>`` folders of a
process that no longer runs) is cleaned by the next write to the same place (:func:`remove_leftovers`).
A path that is an existing folder is refused before anything is written (IsADirectoryError naming it). The
folders a write creates for its file (``make_parents``, :func:`folder_writer`) are removed again, while empty,
when the write fails: nothing of a failed write is left.
"""

from __future__ import annotations

import contextlib
import errno
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
    created = _make_parents([path]) if make_parents else []
    try:
        tmp = _write_temporary(path, data)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.replace(tmp, path)
    finally:
        _unlink(tmp)
    fsync_dir(path.parent)
    return path


def _make_parents(paths: list[Path]) -> list[Path]:
    """Create the missing folders above ``paths``; returns those created, deepest first (for :func:`_remove_empty`)."""
    created: list[Path] = []
    for path in paths:
        missing = []
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        try:
            for folder in reversed(missing):
                try:
                    folder.mkdir()
                except FileExistsError:  # made meanwhile by another writer: not ours to remove
                    continue
                created.insert(0, folder)
        except BaseException:
            _remove_empty(created)
            raise
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write created (deepest first), each only while it is still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in ``path.tmp-<pid>``, flushed and fsynced (removed again if that fails); an existing folder at
    ``path`` is refused first, and the leftovers of killed writes to ``path`` are removed."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    remove_leftovers(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:  # name the file being written, not its temporary name
        _unlink(tmp)
        raise type(error)(error.errno, error.strerror, str(path)) from error
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def atomic_write_files(files: Mapping[str | os.PathLike, bytes], *, make_parents: bool = False) -> list[Path]:
    """Write several files that belong together (a report's page, picture and data): every file is first
    written and fsynced under its temporary name, and only then are they all renamed into place, so a failure
    while writing (a full disk, a folder in the way) leaves every old file as it was. Returns the paths."""
    paths = [Path(p) for p in files]
    for path in paths:  # refuse before writing anything
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    created = _make_parents(paths) if make_parents else []
    written: list[Path] = []
    try:
        for path, data in zip(paths, files.values()):
            written.append(_write_temporary(path, data))
    except BaseException:
        for tmp in written:
            _unlink(tmp)
        _remove_empty(created)  # a failed write leaves no new empty folder either
        raise
    try:
        for tmp, path in zip(written, paths):
            os.replace(tmp, path)
    finally:
        for tmp in written:
            _unlink(tmp)
    for folder in dict.fromkeys(path.parent for path in paths):
        fsync_dir(folder)
    return paths


def check_writable(path: str | os.PathLike) -> Path:
    """Find out now, before a long computation, whether a file can be written at ``path`` later: an OSError naming
    ``path`` (a folder in the way, a file where a folder is needed, a read-only or refused folder) when not.
    Probes the nearest existing folder with a temporary file of the writer's own name, removed at once; creates
    nothing else. Returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is a file, not a folder", str(path))
    probe = folder / f"{path.name}.tmp-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return path
    except OSError as error:
        raise type(error)(error.errno, error.strerror, str(path)) from error
    _unlink(probe)
    return path


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (this process does; a process of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as someone else
        return True
    return True


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writes to ``path`` left beside it, for processes that no longer run: the files
    ``name.tmp-<pid>`` (:func:`atomic_write_bytes`) and the folders ``.name.tmp-<pid>`` (:func:`folder_writer`);
    a ``.name.old-<pid>`` folder (the previous folder set aside by :func:`replace_folder`) is put back at ``path``
    when ``path`` is missing, else removed. Returns what was removed; one that cannot be removed is left."""
    path = Path(path)
    removed: list[Path] = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:  # a missing or unreadable folder holds no leftovers we could remove
        return removed
    for entry in sorted(siblings):
        name = entry.name
        match = _LEFTOVER.search(name)
        if match is None or _running(int(match.group(2))):
            continue
        stem = name[: match.start()]
        if match.group(1) == "tmp" and stem == path.name and not entry.is_dir():
            _unlink(entry)
        elif stem == f".{path.name}" and entry.is_dir() and not entry.is_symlink():
            if match.group(1) == "old" and not path.exists():
                os.replace(entry, path)  # killed between replace_folder's two renames: the old folder comes back
                continue
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        removed.append(entry)
    return removed


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


@contextlib.contextmanager
def folder_writer(final: str | os.PathLike) -> Iterator[Path]:
    """``with folder_writer(final) as tmp:`` write the files into ``tmp`` (``.name.tmp-<pid>`` beside ``final``);
    when the block ends without an error the folder replaces ``final`` (:func:`replace_folder`, the old one
    removed), and when it raises, ``tmp`` is removed and ``final`` is left as it was. Leftovers of killed
    writes of ``final`` are removed first."""
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
