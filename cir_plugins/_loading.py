"""Load a user's model factory from a command-line spec (``file.py:function`` or ``pkg.mod:function``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, explain

__all__ = ["load_factory"]


def load_factory(spec: str) -> Callable[..., Any]:
    """Return the callable named by ``spec``.

    ``spec`` is ``path/to/file.py:name`` (a file is imported as a fresh module) or
    ``package.module:name`` (imported normally). The callable usually builds a CIR model.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(explain("a factory spec must look like 'file.py:function' or 'pkg.module:function'",
                                  got=spec, fix="name the file or module, a colon, and the function"))
    where, name = spec.split(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(explain("the factory file does not exist", got=str(path),
                                      fix="give a path to an existing .py file"))
        module_name = f"_cir_plugins_factory_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        module = importlib.import_module(where)
    if not hasattr(module, name):
        raise ConfigError(explain(f"{where} has no attribute {name!r}", got=spec,
                                  expected=sorted(n for n in dir(module) if not n.startswith("_"))[:20],
                                  fix="check the function's name"))
    return getattr(module, name)
