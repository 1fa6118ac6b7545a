"""What the library shows on a console: progress bars and rounded numbers in logs.

:func:`progress_bar` makes every tqdm bar: ``show_progress`` False = none; True = one only when stderr is a
terminal; "always" = one even on a redirected stderr, redrawn there at most every :data:`REDIRECTED_INTERVAL_S`.
:func:`format_values`: ``{"R@1": 57.49999999999999, "n_queries": 40}`` -> ``"R@1 57.50, n_queries 40"``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

from tqdm.auto import tqdm

from .errors import ConfigError, explain

__all__ = ["progress_bar", "progress_disabled", "format_values", "REDIRECTED_INTERVAL_S"]

#: seconds between two redraws of a bar shown ("always") on a stderr that is not a terminal
REDIRECTED_INTERVAL_S = 60.0


def progress_disabled(show_progress: bool | str) -> bool | None:
    """tqdm's ``disable`` for ``show_progress``: True (no bar), None (a bar when stderr is a terminal) or False."""
    if show_progress == "always":
        return False
    if isinstance(show_progress, str):
        raise ConfigError(explain("show_progress must be True, False or 'always'", got=show_progress,
                                  fix="pass show_progress=True (a bar on a terminal), 'always' or False"))
    return None if show_progress else True


def progress_bar(iterable: Iterable | None = None, *, desc: str, show_progress: bool | str = True, **kwargs: Any):
    """A labelled tqdm bar over ``iterable`` (or a manual one with ``total=``) shown per :func:`progress_disabled`;
    on a redirected stderr a shown bar redraws every :data:`REDIRECTED_INTERVAL_S` seconds at most."""
    disable = progress_disabled(show_progress)
    if disable is False and not _stderr_is_terminal():
        kwargs.setdefault("mininterval", REDIRECTED_INTERVAL_S)
        kwargs.setdefault("maxinterval", REDIRECTED_INTERVAL_S)
    return tqdm(iterable, desc=desc, disable=disable, **kwargs)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed stream
        return False


def _format(value: Any, digits: int) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int):  # bool included
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return None


def format_values(values: Mapping[str, Any], digits: int = 2) -> str:
    """``"key value, ..."`` with floats rounded to ``digits`` places (small ones in 2 significant digits,
    whole ones as integers); values that are not numbers or short strings are left out."""
    return ", ".join(f"{key} {text}" for key, value in values.items() if (text := _format(value, digits)) is not None)
