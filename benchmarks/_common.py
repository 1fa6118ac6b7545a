"""What the benchmark scripts share: the record header (name, UTC date, exact command) and the atomic JSON write.

Imported as ``_common`` (the scripts run as ``python benchmarks/<name>.py``, so this folder is on sys.path).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone


def record_header(benchmark: str) -> dict:
    """The first fields of every benchmark's JSON: its name, the UTC date and the command that ran it."""
    return dict(benchmark=benchmark, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable), *sys.argv]))


def write_json(path: str, data: dict) -> None:
    """Write ``data`` (indent 1) to ``path`` atomically: folders made, temp file in the same folder, fsync,
    os.replace."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
