"""Atomic JSON files, shared by the modules that write small JSON (annotations, submissions, the synthetic world).

Private to the package. (``positives.annotations.atomic_write_json`` keeps its own format: indent 1, non-ASCII
kept, a final newline, the folder fsynced.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_json(path: Path, data: Any, *, indent: int | None = None, make_parents: bool = False) -> None:
    """Write ``data`` as JSON (UTF-8, ``json.dump`` with ``indent``) atomically: ``path.tmp-<pid>`` in the same
    folder, flush + fsync, ``os.replace``. ``make_parents`` creates the missing folders first."""
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
