"""The base of every settings dataclass (training configs, AugmentConfig): help text per field, JSON round-trip.

Fields are ``name: type = option(default, "what it means")``; the class docstring's Attributes section and
``--help`` read that text. Subclasses validate in ``__post_init__``."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ConfigError, explain

__all__ = ["Config", "option", "field_docs", "document"]


def option(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - the argparse word
    """A dataclass field with a default and its help text (``metadata={"help": ...}``)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its help text, for every field of a dataclass that has one."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}


def document(cls: type) -> type:
    """Class decorator: append an ``Attributes:`` section (every field: type, default, help) to the docstring,
    so ``help(cls)`` and IDEs show what each field means."""
    lines = ["", "", "    Attributes:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"        {f.name} ({f.type}, default {default!r}): {f.metadata.get('help', 'undocumented')}")
    cls.__doc__ = (cls.__doc__ or cls.__name__).rstrip() + "\n".join(lines) + "\n"
    return cls


class Config:
    """JSON round-trip for dataclass configs: :meth:`to_dict` (tuples become lists) and :meth:`from_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - names):
            raise ConfigError(explain(f"unknown {cls.__name__} fields", got=unknown, expected=sorted(names)))
        return cls(**data)
