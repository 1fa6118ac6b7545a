"""The Python examples the user reads run as written: the README's snippet and every docstring example of the
package (the indented Python blocks of the docstrings), each in one namespace that holds what the example
assumes exists (a model, a split, a captioner, ...) built from the toy model and toy world.

An example that does not parse as Python (a command line, a formula) is not an example to run; a new Python
example in a docstring is picked up by ``test_every_docstring_example_is_run`` and must be given its setting here.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _toy import ToyCIRWithReference, make_world

import cir_plugins as cp
from cir_plugins.data.split import Split
from cir_plugins.positives.rewriters import as_rewriter

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cir_plugins"


def python_blocks(text: str) -> list[str]:
    """The indented blocks of a docstring that parse as Python and call something (dedented)."""
    blocks = []
    for block in re.findall(r"(?<=\n)\n((?:    [^\n]*\n?)+)", "\n" + text + "\n"):
        code = "\n".join(line[4:] for line in block.rstrip().splitlines())
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue  # a command line or a formula
        if any(isinstance(node, ast.Call) for node in ast.walk(tree)):
            blocks.append(code)
    return blocks


def docstring_examples() -> dict[str, list[str]]:
    """``module path -> its Python examples`` over every docstring of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and python_blocks(doc):
                    found.setdefault(str(path.relative_to(ROOT)), []).extend(python_blocks(doc))
    return found


class AnySizeToy(ToyCIRWithReference):
    """The toy model on images of any size: each tower pools the image to (3, 4, 4) first."""

    def encode_image(self, images):
        return super().encode_image(F.adaptive_avg_pool2d(images, 4))

    def encode_reference(self, images):
        return super().encode_reference(F.adaptive_avg_pool2d(images, 4))


class WordCaptioner:
    """Captions an image by its id: a colour and a size word (a few distinct captions)."""

    name = "words-v1"

    def __call__(self, ids, images):
        return [f"a {('red', 'blue', 'green')[zlib.crc32(i.encode()) % 3]} "
                f"{('big', 'small')[zlib.crc32(i.encode()) // 3 % 2]} thing" for i in ids]


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """What the examples assume, on the toy world: a model, splits, a bank, a captioner, run folders."""
    from cir_plugins.data.fixtures import build_cirr_tree

    here = tmp_path_factory.mktemp("docs")
    images, train, val = make_world(n_images=40, n_train=24, n_val=8)
    ids = list(images)
    # CIRR-like groups for the validation queries (Rmean needs them): reference, target and four others
    val = [dataclasses.replace(t, members=(t.reference, t.target,
                                           *[i for i in ids if i not in (t.reference, t.target)][k:k + 4]))
           for k, t in enumerate(val)]
    split = Split(dataset="synthetic", split="train", triplets=train, gallery_ids=ids, images=images)
    val_split = Split(dataset="synthetic", split="val", triplets=val, gallery_ids=ids, images=images)
    model = AnySizeToy()
    bank = cp.NegativeBank.build(model, ids, images, show_progress=False)
    bank.save(here / "bank.safetensors")
    small = dict(epochs=1, batch_size=8, steps_per_epoch=2, lr=1e-2, show_progress=False)
    # the run folders the results examples load: stage 1, then stage 2 on top of it, of another toy model
    runner = AnySizeToy()
    cp.Stage1Trainer(runner, train, images, config=cp.Stage1Config(output_dir=str(here / "runs/stage1"),
                                                                   **small)).fit()
    runner_bank = cp.NegativeBank.build(runner, ids, images, show_progress=False)
    cp.Stage2Trainer(runner, runner_bank, train, images,
                     config=cp.Stage2Config(output_dir=str(here / "runs/stage2"), **small)).fit()
    build_cirr_tree(here / "DATA/cirr", n_images=12, n_triplets=4)
    return {
        "cp": cp, "torch": torch, "F": F, "here": here,
        "model": model, "split": split, "val": val_split, "val_split": val_split, "bank": bank,
        "triplets": train, "images": images, "gallery_ids": ids, "groups": None,
        "captioner": WordCaptioner(), "rewriter": as_rewriter(str.upper),
        "pairs": [("a red dog", "a blue dog")], "texts": [[("template", "make it blue")]],
        "cfg": cp.Stage2Config(**small), "val_loss": lambda m: 1.0,
        "make_model": AnySizeToy, "build": AnySizeToy, "reproduce": cp.reproduce, "load_recipe": cp.load_recipe,
    }


def _run(code: str, namespace: dict, tmp_path: Path, monkeypatch) -> dict:
    """Run ``code`` in a copy of ``namespace`` from the run folder (relative paths resolve there)."""
    monkeypatch.chdir(namespace["here"])
    glob = dict(namespace)
    exec(compile(code, "<example>", "exec"), glob)  # noqa: S102 - the documented example itself
    return glob


def _small_training(code: str) -> str:
    """The examples' training settings, shrunk to the toy world (the calls and their arguments stay)."""
    return code.replace("epochs=3, batch_size=256", "epochs=1, batch_size=8, show_progress=False")


def _stub_hub(monkeypatch):
    """push_to_hub's upload client stubbed (no network here; tests/results/test_share.py checks the calls)."""
    import huggingface_hub

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            return f"https://huggingface.co/{repo_id}/tree/main"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")


# how each module's examples run: extra setup of the namespace, and changes that only shrink sizes
SETTINGS = {
    "cir_plugins/positives/augmenter.py": {},
    "cir_plugins/positives/rewriters.py": {},
    "cir_plugins/recipes/__init__.py": {},
    "cir_plugins/training/evaluator.py": {},
    "cir_plugins/training/stage2.py": {"shrink": True},
    "cir_plugins/training/loop.py": {},
    "cir_plugins/trained.py": {},
    "cir_plugins/share.py": {"hub": True},
    "cir_plugins/recipes/run.py": {"replace": {'captioner=captioner,': 'captioner=captioner, image_size=8, '
                                                                       'show_progress=False, stage2_overrides='
                                                                       '{"epochs": 1, "batch_size": 4}, '
                                                                       # 12 images: the release's absolute
                                                                       # window is for the full data set
                                                                       'rank_window=(0.0, 1.0),'}},
}


def test_every_docstring_example_is_run():
    assert set(docstring_examples()) == set(SETTINGS)


@pytest.mark.parametrize("module", sorted(SETTINGS))
def test_docstring_examples_run(module, namespace, tmp_path, monkeypatch):
    setting = SETTINGS[module]
    if setting.get("hub"):
        _stub_hub(monkeypatch)
    for code in docstring_examples()[module]:
        if setting.get("shrink"):
            code = _small_training(code)
        for old, new in setting.get("replace", {}).items():
            assert old in code, (module, old)
            code = code.replace(old, new)
        glob = _run(code, namespace, tmp_path, monkeypatch)
        if module == "cir_plugins/positives/augmenter.py":
            assert isinstance(glob["result"], cp.AugmentResult) and glob["result"].triplets
        if module == "cir_plugins/recipes/run.py":
            assert glob["result"].rows()


def test_readme_snippet_runs_and_trains(namespace, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## Use the loss in your own training loop", 1)[1].split("```python", 1)[1]
    snippet = snippet.split("```", 1)[0]
    model = namespace["model"]
    query_side = [p for name, p in model.named_parameters() if not name.startswith("image_proj")]
    t = namespace["triplets"][:8]
    images = namespace["images"]
    glob = {**namespace, "query_side_parameters": query_side, "texts": [x.texts[0] for x in t],
            "ref_images": torch.stack([images[x.reference] for x in t]),
            "target_ids": [x.target for x in t], "reference_ids": [x.reference for x in t]}
    before = [p.detach().clone() for p in query_side]
    exec(compile(snippet, "<README>", "exec"), glob)  # noqa: S102 - the README's snippet itself
    assert torch.isfinite(glob["loss"]) and any(not torch.equal(a, p) for a, p in zip(before, query_side))


if __name__ == "__main__":
    json.dump(docstring_examples(), sys.stdout, indent=1)
