"""Untrusted files: a static audit of the package and examples, plus the runtime defaults it implies.

- Nothing is unpickled: no pickle / dill / joblib / shelve / marshal imports, no ``torch.load``
  without ``weights_only=True``, no ``numpy.load(..., allow_pickle=True)``.
- ``trust_remote_code`` is never True by default: no call passes a literal True, every parameter
  of that name defaults to False, and the CLI flag is opt-in.
- Files the library writes are written atomically: a function that writes a file (``open`` for
  writing, ``write_text`` / ``write_bytes``, ``save_file``, a PIL ``.save``) also swaps it in with
  ``os.replace``, or it is listed below with the reason it cannot leave a half-written file that a
  later run would read as whole.

Each checker is first run on small code snippets that break the rule, so the audit itself can fail.
"""

from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "cir_plugins").rglob("*.py")) + sorted((REPO / "examples").rglob("*.py"))

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}

# Writes that are not followed by os.replace in the same function, and why that is safe.
NON_ATOMIC_ALLOWED = {
    # the package's one writer: the temporary file ``name.tmp-<pid>``, flushed and fsynced, which its callers
    # (atomic_write_bytes, atomic_write_files) then os.replace over the target
    ("cir_plugins/_atomic.py", "_write_temporary"),
    # a checkpoint's files are written into a fresh temporary folder that _atomic.replace_folder then
    # renames into place whole (state.json, written last, records the others' sizes and hashes)
    ("cir_plugins/training/checkpoint.py", "save_checkpoint"),
    # the caption cache is an append-only JSONL file: every line is flushed + fsynced and a torn
    # last line (no newline) is ignored, counted and cut off when the cache is reopened
    ("cir_plugins/positives/captioners.py", "append"),
    # the synthetic world's GENERATING marker is written *before* generation and removed after the
    # completion marker is written atomically; a torn marker only means "not finished"
    ("cir_plugins/data/synthetic.py", "make_world"),
    # synthetic images are written at their final names, but the world counts as complete only
    # once the completion marker is written atomically after every image; a killed run leaves
    # GENERATING behind and the next call regenerates the image folders from scratch
    ("cir_plugins/data/synthetic.py", "_render_chunk"),
    # reopening the caption cache cuts a torn last line off in place (r+b truncate + fsync): the
    # bytes kept are exactly the complete lines already read
    ("cir_plugins/positives/captioners.py", "_load"),
    # a thumbnail saved into an in-memory io.BytesIO for a data: URI, not a file
    ("cir_plugins/report.py", "_data_uri"),
}


def _name(node: ast.AST) -> str:
    """Dotted name of a call target: ``torch.load``, ``np.load``, ``open``, ``x.save`` -> ``.save``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else f".{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _only_catches_unpickling_errors(tree: ast.AST, module: str) -> bool:
    """True when ``module`` (imported as a plain name) is used only as ``module.UnpicklingError``: a loader
    catching the error torch.load(weights_only=True) raises for a pickle that would run code."""
    uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == module]
    attributes = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                  and n.value.id == module]
    return bool(attributes) and len(uses) == len(attributes) and all(n.attr == "UnpicklingError" for n in attributes)


def unpickling_problems(source: str, where: str = "<snippet>") -> list[str]:
    """Every import of a pickling module (but one used only for ``pickle.UnpicklingError``) and every unsafe
    load call in ``source``."""
    problems = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"{where}:{node.lineno}: imports {a.name}" for a in node.names
                         if a.name.split(".")[0] in PICKLE_MODULES
                         and not (a.name == "pickle" and a.asname is None
                                  and _only_catches_unpickling_errors(tree, "pickle"))]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLE_MODULES:
            problems.append(f"{where}:{node.lineno}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            if name == "torch.load" or name.endswith(".torch.load"):
                if not _is_true(_keyword(node, "weights_only")):
                    problems.append(f"{where}:{node.lineno}: {name} without weights_only=True")
            if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy"):
                if _is_true(_keyword(node, "allow_pickle")):
                    problems.append(f"{where}:{node.lineno}: {name} with allow_pickle=True")
            if name.endswith("from_pretrained") or name.endswith("torch.hub.load"):
                if _is_true(_keyword(node, "trust_remote_code")):
                    problems.append(f"{where}:{node.lineno}: {name} with trust_remote_code=True")
    return problems


def remote_code_problems(source: str, where: str = "<snippet>") -> list[str]:
    """trust_remote_code passed as a literal True, or a parameter of that name not defaulting to False."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            value = _keyword(node, "trust_remote_code")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False) \
                    and not isinstance(value, (ast.Name, ast.Attribute)):
                problems.append(f"{where}:{node.lineno}: trust_remote_code={ast.unparse(value)}")
            for keyword in node.keywords:  # **{"trust_remote_code": True}
                if keyword.arg is None and isinstance(keyword.value, ast.Dict):
                    for key, val in zip(keyword.value.keys, keyword.value.values):
                        if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(val):
                            problems.append(f"{where}:{node.lineno}: **{{'trust_remote_code': True}}")
            if _name(node.func).endswith("add_argument") and any(
                    isinstance(a, ast.Constant) and "trust-remote-code" in str(a.value) for a in node.args):
                action = _keyword(node, "action")
                default = _keyword(node, "default")
                if not (isinstance(action, ast.Constant) and action.value == "store_true") or _is_true(default):
                    problems.append(f"{where}:{node.lineno}: --trust-remote-code is not an opt-in store_true flag")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            pairs = list(zip(positional, defaults)) + list(zip(args.kwonlyargs, args.kw_defaults))
            for arg, default in pairs:
                if arg.arg == "trust_remote_code" and not (
                    isinstance(default, ast.Constant) and default.value is False
                ):
                    problems.append(
                        f"{where}:{node.lineno}: {node.name}(trust_remote_code=...) does not default to False"
                    )
        elif isinstance(node, ast.Assign):  # kwargs["trust_remote_code"] = True
            for target in node.targets:
                if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant) \
                        and target.slice.value == "trust_remote_code" and _is_true(node.value):
                    problems.append(f"{where}:{node.lineno}: sets trust_remote_code to True")
    return problems


def _writes(function: ast.AST) -> list[tuple[int, str]]:
    """(line, description) of every file write in ``function`` (nested functions excluded)."""
    found = []
    for node in _walk_own(function):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name == "open":
            mode = node.args[1] if len(node.args) > 1 else _keyword(node, "mode")
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+"):
                found.append((node.lineno, f"open(..., {mode.value!r})"))
        elif name.endswith((".write_text", ".write_bytes")) or name in ("save_file",) or name.endswith(".save_file"):
            found.append((node.lineno, name))
        elif name.endswith(".save") and any(k.arg == "format" for k in node.keywords):  # PIL image.save
            found.append((node.lineno, name))
    return found


def _walk_own(function: ast.AST):
    """ast.walk that does not descend into nested function definitions."""
    stack = list(ast.iter_child_nodes(function))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def non_atomic_writes(source: str, where: str = "<snippet>") -> list[tuple[str, str]]:
    """(function name, description) of writes in functions that never call os.replace / os.rename."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        writes = _writes(node)
        if not writes:
            continue
        swaps = any(isinstance(n, ast.Call) and _name(n.func) in ("os.replace", "os.rename", ".replace", ".rename")
                    and (_name(n.func).startswith("os.") or not n.args or len(n.args) == 1)
                    for n in _walk_own(node))
        if not swaps:
            problems += [(node.name, f"{where}:{line}: {what}") for line, what in writes]
    return problems


# ---------------------------------------------------------------------------- the checkers can fail


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "from joblib import load",
    "import torch\nx = torch.load('f.pt')",
    "import torch\nx = torch.load('f.pt', weights_only=False)",
    "import numpy as np\nx = np.load('a.npy', allow_pickle=True)",
])
def test_unpickling_checker_catches_each_form(snippet):
    assert unpickling_problems(snippet)


def test_unpickling_checker_accepts_safe_forms():
    assert unpickling_problems("import torch\nx = torch.load('f.pt', weights_only=True)\n"
                               "from safetensors.torch import load_file\ny = load_file('w.safetensors')") == []
    catching = ("import pickle\ntry:\n    x = torch.load('f.pt', weights_only=True)\n"
                "except pickle.UnpicklingError:\n    raise\n")
    assert unpickling_problems(catching) == []
    assert unpickling_problems(catching + "y = pickle.loads(b'')\n")  # any other use is still flagged
    assert unpickling_problems(catching + "u = pickle\n")


@pytest.mark.parametrize("snippet", [
    "m = AutoModel.from_pretrained('x', trust_remote_code=True)",
    "def load(path, trust_remote_code=True): pass",
    "def load(path, *, trust_remote_code=None): pass",
    "m = f('x', **{'trust_remote_code': True})",
    "kwargs['trust_remote_code'] = True",
    "p.add_argument('--trust-remote-code', default=True)",
])
def test_remote_code_checker_catches_each_form(snippet):
    assert remote_code_problems(snippet)


def test_remote_code_checker_accepts_a_forwarded_opt_in():
    source = ("def load(path, *, trust_remote_code=False):\n"
              "    return AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)\n"
              "p.add_argument('--trust-remote-code', action='store_true')")
    assert remote_code_problems(source) == []


def test_atomic_write_checker_catches_a_direct_write_and_accepts_temp_plus_replace():
    direct = "def save(path, text):\n    with open(path, 'w') as h:\n        h.write(text)\n"
    assert non_atomic_writes(direct) == [("save", "<snippet>:2: open(..., 'w')")]
    assert non_atomic_writes("def save(path, b):\n    path.write_bytes(b)\n")
    atomic = ("import os\ndef save(path, text):\n    tmp = f'{path}.tmp'\n    with open(tmp, 'w') as h:\n"
              "        h.write(text)\n        os.fsync(h.fileno())\n    os.replace(tmp, path)\n")
    assert non_atomic_writes(atomic) == []


# ---------------------------------------------------------------------------- the audit itself


def _relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_sources_were_found():
    names = {_relative(p) for p in SOURCES}
    assert {"cir_plugins/negatives/bank.py", "cir_plugins/positives/captioners.py",
            "cir_plugins/training/checkpoint.py"} <= names


def test_nothing_is_unpickled_anywhere():
    problems = [p for path in SOURCES for p in unpickling_problems(path.read_text(), _relative(path))]
    assert problems == []


def test_trust_remote_code_is_never_on_by_default():
    problems = [p for path in SOURCES for p in remote_code_problems(path.read_text(), _relative(path))]
    assert problems == []


def test_library_writes_are_atomic_or_listed_with_a_reason():
    found = set()
    problems = []
    for path in sorted((REPO / "cir_plugins").rglob("*.py")):
        for function, where in non_atomic_writes(path.read_text(), _relative(path)):
            key = (_relative(path), function)
            if key in NON_ATOMIC_ALLOWED:
                found.add(key)
            else:
                problems.append(where + f" (in {function})")
    assert problems == []
    # every allowance still names a real write (so the list cannot silently go stale)
    assert found == NON_ATOMIC_ALLOWED


def test_runtime_defaults_keep_remote_code_off():
    from cir_plugins.positives.captioners import HFCaptioner

    assert inspect.signature(HFCaptioner).parameters["trust_remote_code"].default is False
    from cir_plugins.cli import augment as command

    parser = argparse.ArgumentParser()
    command.configure(parser)
    action = next(a for a in parser._actions if "--trust-remote-code" in a.option_strings)
    assert action.default is False and action.nargs == 0  # a flag the user must give
