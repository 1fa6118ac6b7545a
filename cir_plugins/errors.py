"""The library's errors: one small hierarchy.

Every error says the value received, what was expected and what to do next (build messages with
:func:`explain`). Each class also subclasses the builtin a caller would naturally catch (ValueError,
TypeError, FileNotFoundError, ...), so ``except ValueError`` keeps working for code that does not know us.
"""

from __future__ import annotations

__all__ = ["CIRPluginsError", "ConfigError", "ShapeError", "DTypeError", "DeviceError", "ModelProtocolError",
           "DataError", "AnnotationError", "ImageLoadError", "UnsafePathError", "BankMismatchError", "CheckpointError",
           "NonFiniteError", "SubmissionError", "HubError", "explain"]


def explain(problem: str, *, got: object = None, expected: object = None, fix: str | None = None) -> str:
    """Format an error message: ``problem; got X; expected Y. Fix: ...``. ``got`` and ``expected`` are shown
    with ``repr`` for strings (a stray space or an empty string stays visible), ``str`` otherwise."""
    parts = [problem.rstrip(".")]
    for word, value in (("got", got), ("expected", expected)):
        if value is not None:
            parts.append(f"{word} {value!r}" if isinstance(value, str) else f"{word} {value!s}")
    message = "; ".join(parts) + "."
    if fix:
        message += f" Fix: {fix.rstrip('.')}."
    return message


class CIRPluginsError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(CIRPluginsError, ValueError):
    """A configuration or argument value out of range or of the wrong kind."""


class ShapeError(CIRPluginsError, ValueError):
    """A tensor whose rank or size breaks the documented shape contract."""


class DTypeError(CIRPluginsError, TypeError):
    """A tensor of a dtype the operation does not accept."""


class DeviceError(CIRPluginsError, ValueError):
    """Tensors that should share a device do not."""


class ModelProtocolError(CIRPluginsError, TypeError):
    """A model that does not meet the CIRModel protocol (missing method, wrong output)."""


class DataError(CIRPluginsError, ValueError):
    """Bad data: unknown image ids, empty captions, duplicate ids, and the like."""


class AnnotationError(DataError):
    """A malformed annotation file or record (names the file and the position)."""


class ImageLoadError(DataError, OSError):
    """An image that is missing, empty, corrupt, truncated or too large (names the id and path)."""


class UnsafePathError(DataError, PermissionError):
    """A path in an annotation file that would escape the dataset root."""


class BankMismatchError(CIRPluginsError, ValueError):
    """A negative bank built by another model, with other weights, dims or similarity."""


class CheckpointError(CIRPluginsError, ValueError):
    """A checkpoint that is missing, incomplete, or does not match the model or config."""


class NonFiniteError(CIRPluginsError, FloatingPointError):
    """A NaN or infinity in embeddings or in the loss (says which step)."""


class SubmissionError(CIRPluginsError, ValueError):
    """A CIRR test submission that the evaluation server would reject."""


class HubError(CIRPluginsError, ConnectionError):
    """An upload to (or a request of) the Hugging Face Hub that failed: offline, no connection, refused."""
