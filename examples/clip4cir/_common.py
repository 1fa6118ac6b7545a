"""Shared plumbing of the CLIP4Cir scripts: datasets, preprocessing, checkpoints, console.

Datasets (``--dataset``):
- ``cirr``: ``--root`` holds ``cirr/`` (rc2); train on "train", validate on "val".
- ``fashioniq``: ``--root`` holds ``captions/``, ``image_splits/``, ``images/``; train on the three
  categories together, evaluate per category (the FashionIQ protocol: Avg R@10 / R@50).
- ``synthetic``: the embedded world (created under ``--root`` if missing); "train" / "val" / "test".
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from model import CLIP4Cir  # noqa: E402
from wrap import wrap  # noqa: E402  (imported here, not inside factory: a loader may take this folder off the path)

import cir_plugins as cp  # noqa: E402
from cir_plugins.data.images import CLIP_MEAN, CLIP_STD, ClipTransform  # noqa: E402

logger = logging.getLogger("clip4cir")

DATASETS = ("cirr", "fashioniq", "synthetic")
CATEGORIES = ("dress", "shirt", "toptee")
# validation during training; evaluate.py's default split (the synthetic world's test split has targets)
VAL_SPLIT = {"cirr": "val", "fashioniq": "val", "synthetic": "val"}
EVAL_SPLIT = {"cirr": "val", "fashioniq": "val", "synthetic": "test"}


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_common_arguments(parser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--root", required=True, help="dataset root (the synthetic world is created there if missing)")
    parser.add_argument("--world-size", default="default", choices=("default", "quick"),
                        help="synthetic world preset, used when --dataset synthetic creates the world")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size-eval", type=int, default=256, help="images per encoder call at evaluation")
    parser.add_argument("--no-progress", action="store_true", help="turn the progress bars off")
    parser.add_argument("-v", "--verbose", action="store_true")


def targetpad(model: CLIP4Cir) -> ClipTransform:
    """CLIP4Cir's targetpad preprocessing at the model's own size / mean / std (from its image processor)."""
    p = model.preprocess or {"size": 224, "mean": CLIP_MEAN, "std": CLIP_STD}
    return ClipTransform("targetpad", p["size"], target_ratio=1.25, mean=p["mean"], std=p["std"])


def load_splits(dataset: str, root: str, split: str, transform, *, world_size: str = "default") -> list:
    """The named split (a list: three category splits for FashionIQ, one split otherwise)."""
    if dataset == "synthetic":
        from cir_plugins.data.synthetic import make_world

        if not (Path(root) / "synthetic" / "world.json").is_file():  # an existing world is used as it is
            make_world(root, seed=0, size=world_size)
        return [cp.load_cirr(root, split, transform=transform)]
    if dataset == "cirr":
        return [cp.load_cirr(root, split, transform=transform)]
    return [cp.load_fashioniq(root, category, split, transform=transform) for category in CATEGORIES]


def train_triplets(splits) -> tuple[list, object]:
    """All triplets with targets, and one images mapping over every split's images (the library's pool of
    FashionIQ's three categories; one split's own store otherwise)."""
    from cir_plugins.recipes.run import training_pool

    pool = training_pool(splits)
    return pool.triplets, pool.images


def evaluate(model, splits, *, batch_size: int, show_progress: bool) -> dict:
    """The dataset's protocol: CIRR / synthetic on one split, FashionIQ over the three categories."""
    if len(splits) == 1:
        return cp.evaluate(model, splits[0], batch_size=batch_size, show_progress=show_progress)
    return cp.evaluate(model, list(splits), batch_size=batch_size, show_progress=show_progress)


def headline(result: dict) -> str:
    """One line of the numbers a paper table shows."""
    keys = ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Avg R@10", "Avg R@50", "Rmean"]
    return "  ".join(f"{k} {result[k]:.2f}" for k in keys if k in result)


def write_json(path: str | os.PathLike, data) -> None:
    """Atomic JSON write (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(model: CLIP4Cir, out_dir: str | os.PathLike) -> Path:
    """CLIP (save_pretrained, safetensors) + tokenizer + image processor + Combiner, loadable by path."""
    from transformers import CLIPImageProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.clip.save_pretrained(out_dir)
    model.tokenizer.save_pretrained(out_dir)
    p = model.preprocess
    CLIPImageProcessor(size={"shortest_edge": p["size"]}, crop_size={"height": p["size"], "width": p["size"]},
                       image_mean=p["mean"], image_std=p["std"]).save_pretrained(out_dir)
    model.save_combiner(str(out_dir / "combiner.safetensors"))
    write_json(out_dir / "clip4cir.json", {"fusion": model.fusion})
    return out_dir


def load_checkpoint(path: str, *, fusion: str | None = None, device: str = "cpu") -> CLIP4Cir:
    """A checkpoint written by save_checkpoint, or any CLIP hub name / directory."""
    meta = Path(path) / "clip4cir.json"
    saved = json.loads(meta.read_text()) if meta.is_file() else {}
    combiner = Path(path) / "combiner.safetensors"
    model = CLIP4Cir.from_pretrained(path, fusion=fusion or saved.get("fusion", "sum"),
                                     combiner_path=str(combiner) if combiner.is_file() else None)
    return model.to(device)


def factory(checkpoint: str, fusion: str | None = None, device: str = "cpu"):
    """The model factory of ``cir-plugins recipe run clip4cir-* --model examples/clip4cir/_common.py:factory
    --factory-kwargs '{"checkpoint": DIR}'``: a checkpoint (save_checkpoint's, a converted stage-1 one, or any
    CLIP hub name / directory) wrapped with stage 2 training the text tower (+ the Combiner)."""
    return wrap(load_checkpoint(checkpoint, fusion=fusion, device=device))


class Timer:
    """Prints one line per step with its time, and the total."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def step(self, name: str, started: float) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {name}: {time.perf_counter() - started:.1f}s", flush=True)
