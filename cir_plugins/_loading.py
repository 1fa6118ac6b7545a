"""Load a user's model factory from a command-line spec (``file.py:function`` or ``pkg.mod:function``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, explain

__all__ = ["load_factory"]


def _import_module(where: str, spec: str) -> Any:
    """``where`` imported as a module, the working directory first on the path (a console script's
    own folder is ``sys.path[0]``, not the folder the user runs it from)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as error:
        if error.name is None or not (where == error.name or where.startswith(error.name + ".")):
            raise ConfigError(explain(f"importing the factory module {where!r} failed: its own import of "
                                      f"{error.name!r} is missing", got=spec,
                                      fix=f"install {error.name} (or fix the import in {where})")) from error
        raise ConfigError(explain(f"no module named {error.name!r} for the factory spec", got=spec,
                                  expected=f"{where.replace('.', '/')}.py (or a package) in the working directory "
                                           f"{cwd} or on sys.path",
                                  fix="run from the folder that holds it, or name the file: "
                                      f"path/to/{where.rsplit('.', 1)[-1]}.py:{spec.split(':')[-1]}")) from error
    except Exception as error:  # the module's own code raised on import
        raise ConfigError(explain(f"importing the factory module {where!r} raised {type(error).__name__}: {error}",
                                  got=spec, fix="fix the module (run with -v for the traceback)")) from error
    finally:
        if added:
            sys.path.remove(cwd)


def _exec_file(path: Path, spec: str) -> Any:
    """The file ``path`` executed as a fresh module (its folder on the path while it runs)."""
    module_name = f"_cir_plugins_factory_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the file's own code raised
        sys.modules.pop(module_name, None)
        raise ConfigError(explain(f"running the factory file {path} raised {type(error).__name__}: {error}",
                                  got=spec, fix="fix the file (run with -v for the traceback)")) from error
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def load_factory(spec: str) -> Callable[..., Any]:
    """Return the callable named by ``spec``.

    ``spec`` is ``path/to/file.py:name`` (a file is imported as a fresh module) or
    ``package.module:name`` (imported normally, the working directory searched first). The callable
    usually builds a CIR model. Every failure (bad spec, missing file or module, the module raising
    on import, no such name) is one :class:`ConfigError` naming the spec and the fix.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(explain("a factory spec must look like 'file.py:function' or 'pkg.module:function'",
                                  got=spec, fix="name the file or module, a colon, and the function"))
    where, name = spec.split(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(explain("the factory file does not exist", got=str(path),
                                      fix="give a path to an existing .py file"))
        module = _exec_file(path, spec)
    else:
        module = _import_module(where, spec)
    if not callable(getattr(module, name, None)):
        raise ConfigError(explain(f"{where} has no function {name!r}", got=spec,
                                  expected=sorted(n for n in dir(module) if not n.startswith("_"))[:20],
                                  fix="check the function's name"))
    return getattr(module, name)
