"""Quickstart: the whole method on the embedded synthetic world, end to end, on a laptop CPU.

Measured results (3 seeds) and costs are in benchmarks/RESULTS.md ("Quickstart") and the README.

    pip install -e . && python examples/quickstart.py            # one seed (world + tiny CLIP cached after the first)
    python examples/quickstart.py --seeds 3                      # mean and spread over seeds 0, 1, 2
    python examples/quickstart.py --quick                        # a tiny budget (tests, CI)
    python examples/quickstart.py --device cuda --out runs/qs    # on a GPU, elsewhere

Steps (each prints its time; long ones show a progress bar):
  a. generate the synthetic world (cached under OUT/cache);
  b. pretrain a tiny transformers CLIPModel on the world's image-caption pairs (scenes.json), standing in
     for a pretrained VLM; saved with save_pretrained (+ a word-level tokenizer and an image processor)
     and loaded back by path, like a real checkpoint (cached);
  c. baseline: the CLIP4Cir example's stage 1 on the annotated triplets only (in-batch negatives, both towers,
     sum fusion, as the SPN release's CLIP4Cir);
  d. the method: +P (generated triplets: every train image captioned by SyntheticCaptioner with realistic
     noise, paired with a near neighbour by rank window, templated, then rewritten by SyntheticRewriter, the
     stand-in for the method's optional LLM rewrite), +N (stage 2 against a bank of every train image),
     +P+N, zero-shot (generated triplets only: stage 1 then stage 2), and the diagnostic "+N, steps of +P+N"
     (stage 2 on the annotated triplets for as many optimiser steps as +P+N's stage 2: with the default's
     equal stage-2 budgets that is the +N run itself);
  e. evaluate every row with the CIRR protocol on the test split; print one table; write results.json,
     results.md and results.png into OUT.

Budgets are fixed before comparing rows (see BUDGETS): stage 1 of the baseline and the zero-shot row take the
same number of optimiser steps, and +P takes as many annotated samples as the baseline plus its generated ones
(annotated_fraction of each batch); every stage-2 run takes the same number of optimiser steps (stage2_steps),
so +N and +P+N differ only in their training triplets and starting model (with stage2_steps=None each takes
stage2_epochs passes over its own triplets, and the diagnostic row "+N (steps of +P+N)" then separates "more
steps" from "more positives"). Every training run, of every row, keeps its best epoch (val-checked round) by
validation Rmean (CIRR protocol on the world's val split), as the method does.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE / "clip4cir"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import cir_plugins as cp  # noqa: E402
from cir_plugins.data.images import ClipTransform  # noqa: E402
from cir_plugins.data.split import Split  # noqa: E402
from cir_plugins.data.synthetic import SyntheticCaptioner, SyntheticRewriter, load_scenes, make_world  # noqa: E402

import _tiny_clip  # noqa: E402
from model import CLIP4Cir  # noqa: E402
from wrap import wrap  # noqa: E402

logger = logging.getLogger("quickstart")

ROWS = ("baseline", "+P", "+N", "+P+N", "zero-shot", "+N (steps of +P+N)")
METRICS = ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Rmean")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # the tiny CLIP's image normalisation (saved in its processor)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Everything that sizes a run. Fixed before any row is compared."""

    # synthetic world (WorldConfig fields): 1000 annotated train queries (6000 images) + 6000 unlabelled images
    world: tuple = (("n_train_triplets", 1000), ("n_train_unlabelled", 6000), ("n_val_queries", 300),
                    ("n_val_distractors", 0), ("n_test_queries", 500), ("n_test_distractors", 1000),
                    ("image_size", 36))
    # tiny CLIP: ViT with one 12 px patch per grid cell, 2 layers of width 64 on each side (("vision", "conv")
    # swaps in a small CNN image tower, _tiny_clip.TinyConvCLIPModel; see RESULTS.md for what it gave)
    clip: tuple = (("patch_size", 12), ("width", 64), ("layers", 2), ("heads", 4), ("projection_dim", 64),
                   ("max_length", 32))
    # query fusion of the CLIP4Cir example: "sum" (normalize(image + text)) or "combiner" (trained with the towers)
    fusion: str = "sum"
    # 30 passes over the 12000 train images: 1380 steps, about the 1400 that 40 passes over 9000 took
    pretrain_epochs: int = 30
    pretrain_batch: int = 256
    pretrain_lr: float = 2e-3
    # stage 1 (CLIP4Cir's CLIP fine-tuning, in-batch negatives). Annotated-only rows take stage1_steps;
    # +P takes stage1_steps / annotated_fraction, so it sees exactly as many annotated samples as the
    # baseline plus the generated ones on top (generated triplets are appended, as in the method)
    stage1_steps: int = 200
    # stage 1's steps are split into this many epochs (only matters with select_on_val)
    stage1_epochs: int = 5
    # keep each training run's best epoch by validation Rmean (CIRR protocol on the val split), as the method
    # does, instead of its last epoch; applies to every row alike
    select_on_val: bool = True
    stage1_batch: int = 128
    stage1_lr: float = 3e-4
    stage1_temperature: float = 0.02
    # share of annotated triplets in each mixed batch (the sampler repeats the 1000 annotated ones)
    annotated_fraction: float = 0.67
    # the same share inside +P+N's stage 2 (None: annotated_fraction)
    stage2_annotated_fraction: float | None = None
    # stage 2 (the method's table for CLIP4Cir: batch 256, 3 epochs, lr 2e-5, tau 0.02 fixed, text tower
    # trained); here 200 steps in 10 val-checked rounds at lr 3e-4: 1000 annotated triplets are 4 steps an
    # epoch, and a tiny model barely moves at 2e-5 (tried: +1.4 Rmean at 16 steps, lr 2e-4)
    stage2_epochs: int = 10
    # every stage-2 run (+N, +P+N, zero-shot) takes this many optimiser steps, split into stage2_epochs
    # val-checked rounds, whatever the size of its training set (None: stage2_epochs passes over it, so +P+N,
    # with 13x the triplets, takes about 13x the steps of +N). Equal steps make +N the diagnostic "+N with the
    # steps of +P+N" by construction
    stage2_steps: int | None = 200
    stage2_batch: int = 256
    stage2_lr: float = 3e-4
    stage2_temperature: float = 0.02
    # generated triplets: captioner noise (attribute dropped or swapped), pairing window (fractions of N)
    caption_noise: float = 0.05
    rank_window: tuple = (0.0, 0.01)
    # modification-text templates: a preset of cir_plugins.positives.templates ("cirr": the two CIRR ones)
    templates: str = "cirr"
    # generated texts over the tokenizer's limit: False = truncated by the tokenizer, True = replaced by the
    # target caption (TextMaker's "target" fallback)
    fit_text_length: bool = True
    # generated triplets kept (seeded subsample of one per train image; 12000 = all of them)
    max_generated: int = 12000
    # the method's optional LLM rewrite of generated texts into the annotators' relative style, stood in for by
    # SyntheticRewriter (it reads only the two noisy captions); pairs more than rewrite_max_edits apart keep
    # their template text
    rewrite: bool = True
    rewrite_max_edits: int = 4
    eval_batch: int = 512

    def __post_init__(self) -> None:
        steps, rounds = self.stage2_steps, self.stage2_epochs
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
                                  or steps % rounds):
            raise ValueError(f"Budget.stage2_steps={steps!r}: expected None or a positive multiple of "
                             f"stage2_epochs={rounds} (each val-checked round takes stage2_steps / stage2_epochs)")

    def to_dict(self) -> dict:
        return {k: (dict(v) if k in ("world", "clip") else v) for k, v in dataclasses.asdict(self).items()}


BUDGETS = {
    "default": Budget(),
    "quick": Budget(world=(("n_train_triplets", 150), ("n_train_unlabelled", 300), ("n_val_queries", 10),
                           ("n_val_distractors", 0), ("n_test_queries", 60), ("n_test_distractors", 100),
                           ("image_size", 36)),
                    pretrain_epochs=2, pretrain_batch=128, stage1_steps=8, stage1_batch=64, stage2_epochs=1,
                    stage2_steps=2,
                    stage2_batch=128, max_generated=300),
}


# ------------------------------------------------------------------------------------------ utilities
class Clock:
    """A line per step with its time, and the total."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        print(f"  -> {name} ...", flush=True)
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - started
        self.steps[name] = self.steps.get(name, 0.0) + seconds
        print(f"  [{time.perf_counter() - self.start:7.1f}s] {name}: {seconds:.1f}s", flush=True)
        return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def atomic_json(path: Path, data) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def preload(split: Split, ids, cache: Path, show_progress: bool) -> dict[str, torch.Tensor]:
    """id -> (3, S, S) targetpad tensors, decoded once and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    ids = list(ids)
    if cache.is_file():
        tensors = load_file(str(cache))
        if tensors["images"].shape[0] == len(ids):
            return dict(zip(ids, tensors["images"]))
    batches = []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(ids), 1000), desc=f"decode {split.split} images", disable=not show_progress):
        batches.append(split.images.batch(ids[start:start + 1000]))  # (n, 3, S, S)
    images = torch.cat(batches)
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    save_file({"images": images.contiguous()}, str(tmp))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, cache)
    return dict(zip(ids, images))


# ------------------------------------------------------------------------------------------ the steps
def make_clip(root: Path, train: Split, images, budget: Budget, cache: Path, seed: int, device: str,
              show_progress: bool) -> Path:
    """Pretrain the tiny CLIP on (train image, exact scene caption) pairs; cached by budget and seed."""
    clip_cfg = dict(budget.clip)
    key = digest({"clip": clip_cfg, "epochs": budget.pretrain_epochs, "lr": budget.pretrain_lr,
                  "batch": budget.pretrain_batch, "world": dict(budget.world), "seed": seed})
    out = cache / f"tiny-clip-{key}"
    if _tiny_clip.is_saved_clip(out):
        print(f"     (cached: {out})")
        return out
    scenes = load_scenes(root)
    ids = list(train.gallery_ids)
    pixels = torch.stack([images[i] for i in ids])  # (N, 3, S, S)
    captions = [scenes[i]["caption"] for i in ids]
    # vocabulary: every word of the world's captions and annotated texts (+ the template words)
    vocabulary = _tiny_clip.words_of(captions + [s["caption"] for s in scenes.values()]
                                     + [t.texts[0] for t in train.triplets])
    _tiny_clip.pretrain_tiny_clip(out, pixels, captions, epochs=budget.pretrain_epochs,
                                  batch_size=budget.pretrain_batch, lr=budget.pretrain_lr, seed=seed, device=device,
                                  image_size=pixels.shape[-1], mean=MEAN, std=STD, vocabulary=vocabulary,
                                  show_progress=show_progress, **clip_cfg)
    return out


def load_model(clip_dir: Path, device: str, fusion: str = "sum") -> CLIP4Cir:
    """The CLIP4Cir example loaded from a checkpoint directory by path (a fresh Combiner when fusion="combiner")."""
    return CLIP4Cir.from_pretrained(str(clip_dir), fusion=fusion).to(device)


def selection(budget: Budget, val: Split | None, name: str, out: Path | None) -> dict:
    """Trainer settings for "best epoch by validation Rmean" (the method's protocol) when the budget asks for it.

    Returns the extra config fields and the evaluate callback; {} when selection is off (the last epoch is kept).
    """
    if not budget.select_on_val or val is None or out is None:
        return {}

    def on_val(model) -> dict:
        result = cp.evaluate(model, val, protocol="cirr", batch_size=budget.eval_batch, show_progress=False)
        return {"Rmean": float(result["Rmean"])}

    return {"config": {"select_metric": "Rmean", "output_dir": str(out / name)}, "evaluate": on_val}


def fit(trainer_cls, args: tuple, config_cls, config: dict, chosen: dict, **kwargs) -> tuple[object, list]:
    """Build and fit a trainer; with validation selection, load the best epoch's weights back."""
    config = config_cls(**{"select_metric": None, **config, **chosen.get("config", {})})  # None: keep the last epoch
    trainer = trainer_cls(*args, config=config, evaluate=chosen.get("evaluate"), **kwargs)
    history = trainer.fit()
    if chosen:
        trainer.load_weights("best")
        best = max(range(len(history)), key=lambda i: history[i]["metrics"]["Rmean"])
        scores = ", ".join(f"{entry['metrics']['Rmean']:.1f}" for entry in history)
        print(f"     best epoch by val Rmean: {best + 1} of {len(history)} ({scores})", flush=True)
    return trainer.model, history


def stage1(clip_dir: Path, triplets, images, budget: Budget, seed: int, device: str, *, mixed: bool,
           show_progress: bool, val: Split | None = None, work: Path | None = None, run_name: str = "stage1") -> CLIP4Cir:
    """CLIP4Cir's own fine-tuning of both CLIP towers with in-batch negatives (Stage1Trainer)."""
    model = load_model(clip_dir, device, budget.fusion)
    steps = round(budget.stage1_steps / budget.annotated_fraction) if mixed else budget.stage1_steps
    epochs = budget.stage1_epochs
    config = dict(epochs=epochs, steps_per_epoch=max(1, round(steps / epochs)), batch_size=budget.stage1_batch,
                  lr=budget.stage1_lr, temperature=budget.stage1_temperature,
                  annotated_fraction=budget.annotated_fraction if mixed else None,
                  seed=seed, show_progress=show_progress)
    trainable = ["clip.text_model", "clip.text_projection", "clip.vision_model", "clip.visual_projection"]
    if budget.fusion == "combiner":
        trainable.append("combiner")
    chosen = selection(budget, val, run_name, work)
    fit(cp.Stage1Trainer, (model, triplets, images), cp.Stage1Config, config, chosen, trainable=trainable)
    return model.eval()


def stage2_share(budget: Budget) -> float:
    return budget.annotated_fraction if budget.stage2_annotated_fraction is None else budget.stage2_annotated_fraction


def stage2(model: CLIP4Cir, triplets, images, bank_ids, budget: Budget, seed: int, *, mixed: bool,
           steps_per_epoch: int | None = None, show_progress: bool, val: Split | None = None,
           work: Path | None = None, run_name: str = "stage2") -> tuple[object, int]:
    """The method's stage 2: the text tower against a static bank of every train image."""
    wrapped = wrap(copy.deepcopy(model))
    bank = cp.NegativeBank.build(wrapped, bank_ids, images, batch_size=budget.eval_batch,
                                 show_progress=show_progress)
    if steps_per_epoch is None and budget.stage2_steps is not None:
        steps_per_epoch = budget.stage2_steps // budget.stage2_epochs  # a multiple (Budget checks it)
    config = dict(epochs=budget.stage2_epochs, batch_size=budget.stage2_batch, lr=budget.stage2_lr,
                  temperature=budget.stage2_temperature,
                  annotated_fraction=stage2_share(budget) if mixed else None,
                  steps_per_epoch=steps_per_epoch, seed=seed,
                  show_progress=show_progress)
    chosen = selection(budget, val, run_name, work)
    _, history = fit(cp.Stage2Trainer, (wrapped, bank, triplets, images), cp.Stage2Config, config, chosen)
    return wrapped.eval(), sum(entry["steps"] for entry in history)


def augment(root: Path, clip_dir: Path, train: Split, images, budget: Budget, seed: int, device: str,
            show_progress: bool) -> list:
    """Generated triplets from every train image (annotated groups and unlabelled ones)."""
    encoder = load_model(clip_dir, device).eval()
    captioner = SyntheticCaptioner(root, noise=budget.caption_noise, seed=seed)
    # with fit_text_length, a text longer than the text tower's limit falls back to the target caption alone
    # instead of being truncated mid-description by the tokenizer
    # (tokens counted as the tokenizer does, without its "longer than the maximum" warning: measuring is the point)
    length_policy = ({"max_tokens": encoder.max_length,
                      "count_tokens": lambda text: len(encoder.tokenizer(text, verbose=False)["input_ids"])}
                     if budget.fit_text_length else {})
    rewriter = SyntheticRewriter(budget.rewrite_max_edits) if budget.rewrite else None
    augmenter = cp.TripletAugmenter(captioner, encoder.encode_image, templates=budget.templates,
                                    rank_window=tuple(budget.rank_window), partners_per_image=1, seed=seed,
                                    max_triplets=budget.max_generated, batch_size=budget.eval_batch,
                                    rewrite=rewriter, **length_policy,
                                    caption_batch_size=1000, show_progress=show_progress)
    triplets = augmenter.augment(list(train.gallery_ids), images, annotated=train.triplets)
    if rewriter is not None:
        print(f"     rewrite: {rewriter.rewritten} texts rewritten, {rewriter.kept} kept as templated", flush=True)
    return [t for t in triplets if t.source == "generated"]


def evaluate(model, test: Split, budget: Budget, show_progress: bool) -> dict:
    result = cp.evaluate(model, test, protocol="cirr", batch_size=budget.eval_batch, show_progress=show_progress)
    metrics = {k: float(result[k]) for k in METRICS}
    print("     " + "  ".join(f"{k} {v:.1f}" for k, v in metrics.items()), flush=True)
    return metrics


def run_seed(seed: int, budget: Budget, out: Path, device: str, show_progress: bool, clock: Clock, *,
             world_seed: int = 0) -> dict:
    """Every row for one training seed. The world and the pretrained CLIP (the 'dataset' and the 'public
    checkpoint') come from ``world_seed`` and are shared by all training seeds, as CIRR and CLIP are."""
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    world = dict(budget.world)
    root = cache / f"world-{digest(world)}-seed{world_seed}"
    clock.run(f"seed {seed}: a. synthetic world", make_world, root, seed=world_seed, size=world,
              show_progress=show_progress)
    transform = ClipTransform("targetpad", world["image_size"], mean=MEAN, std=STD)
    train = cp.load_cirr(root, "train", transform=transform)
    test = cp.load_cirr(root, "test", transform=transform)
    val = cp.load_cirr(root, "val", transform=transform) if budget.select_on_val else None
    images = clock.run(f"seed {seed}: a. decode images", lambda: {
        **preload(train, train.gallery_ids, root / "train-images.safetensors", show_progress),
        **preload(test, test.gallery_ids, root / "test-images.safetensors", show_progress),
        **(preload(val, val.gallery_ids, root / "val-images.safetensors", show_progress) if val else {})})
    test = dataclasses.replace(test, images={i: images[i] for i in test.gallery_ids})
    if val is not None:
        val = dataclasses.replace(val, images={i: images[i] for i in val.gallery_ids})
    work = out / "checkpoints" / f"seed{seed}"  # per-epoch checkpoints when the best epoch is chosen on val
    clip_dir = clock.run(f"seed {seed}: b. pretrain tiny CLIP", make_clip, root, train, images, budget, cache,
                         world_seed, device, show_progress)
    annotated = [t for t in train.triplets if t.target is not None]
    bank_ids = list(train.gallery_ids)
    results, info = {}, {}

    pretrained = load_model(clip_dir, device).eval()
    results["pretrained CLIP, no CIR training"] = clock.run(f"seed {seed}: e. evaluate pretrained", evaluate,
                                                            pretrained, test, budget, show_progress)
    baseline = clock.run(f"seed {seed}: c. baseline stage 1", stage1, clip_dir, annotated, images, budget, seed,
                         device, mixed=False, show_progress=show_progress, val=val, work=work, run_name="baseline")
    results["baseline"] = clock.run(f"seed {seed}: e. evaluate baseline", evaluate, baseline, test, budget,
                                    show_progress)
    generated = clock.run(f"seed {seed}: d. augment (caption, pair, template)", augment, root, clip_dir, train,
                          images, budget, seed, device, show_progress)
    info["generated_triplets"] = len(generated)
    info["annotated_triplets"] = len(annotated)
    plus_p = clock.run(f"seed {seed}: d. +P stage 1", stage1, clip_dir, annotated + generated, images, budget,
                       seed, device, mixed=True, show_progress=show_progress, val=val, work=work, run_name="plus_p")
    results["+P"] = clock.run(f"seed {seed}: e. evaluate +P", evaluate, plus_p, test, budget, show_progress)
    plus_n, steps_n = clock.run(f"seed {seed}: d. +N stage 2", stage2, baseline, annotated, images, bank_ids,
                                budget, seed, mixed=False, show_progress=show_progress, val=val, work=work,
                                run_name="plus_n")
    results["+N"] = clock.run(f"seed {seed}: e. evaluate +N", evaluate, plus_n, test, budget, show_progress)
    plus_pn, steps_pn = clock.run(f"seed {seed}: d. +P+N stage 2", stage2, plus_p, annotated + generated, images,
                                  bank_ids, budget, seed, mixed=True, show_progress=show_progress, val=val,
                                  work=work, run_name="plus_pn")
    results["+P+N"] = clock.run(f"seed {seed}: e. evaluate +P+N", evaluate, plus_pn, test, budget, show_progress)
    zero1 = clock.run(f"seed {seed}: d. zero-shot stage 1", stage1, clip_dir, generated, images, budget, seed,
                      device, mixed=False, show_progress=show_progress, val=val, work=work, run_name="zero1")
    zero, _ = clock.run(f"seed {seed}: d. zero-shot stage 2", stage2, zero1, generated, images, bank_ids, budget,
                        seed, mixed=False, show_progress=show_progress, val=val, work=work, run_name="zero2")
    results["zero-shot"] = clock.run(f"seed {seed}: e. evaluate zero-shot", evaluate, zero, test, budget,
                                     show_progress)
    if steps_n == steps_pn:  # equal stage-2 budgets: +N already is +N with the steps of +P+N
        print(f"     +N (steps of +P+N) = +N: both took {steps_n} stage-2 steps", flush=True)
        results["+N (steps of +P+N)"], steps_eq = results["+N"], steps_n
    else:
        per_epoch = max(1, steps_pn // budget.stage2_epochs)
        equal, steps_eq = clock.run(f"seed {seed}: d. +N with the steps of +P+N", stage2, baseline, annotated,
                                    images, bank_ids, budget, seed, mixed=False, steps_per_epoch=per_epoch,
                                    show_progress=show_progress, val=val, work=work, run_name="plus_n_equal")
        results["+N (steps of +P+N)"] = clock.run(f"seed {seed}: e. evaluate +N (steps of +P+N)", evaluate, equal,
                                                  test, budget, show_progress)
    info["stage2_steps"] = {"+N": steps_n, "+P+N": steps_pn, "+N (steps of +P+N)": steps_eq}
    info["stage1_steps"] = {"baseline": budget.stage1_steps, "zero-shot": budget.stage1_steps,
                            "+P": round(budget.stage1_steps / budget.annotated_fraction)}
    return {"rows": results, "info": info}


# ------------------------------------------------------------------------------------------ report
def summarise(per_seed: dict[int, dict]) -> dict:
    rows = list(next(iter(per_seed.values()))["rows"])
    table = {}
    for row in rows:
        table[row] = {}
        for metric in METRICS:
            values = [per_seed[s]["rows"][row][metric] for s in per_seed]
            table[row][metric] = {"mean": statistics.fmean(values),
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                  "values": values}
    return table


def format_table(table: dict, n_seeds: int) -> str:
    width = max(len(r) for r in table) + 2
    head = "row".ljust(width) + "".join(m.rjust(13) for m in METRICS)
    lines = [head, "-" * len(head)]
    for row, metrics in table.items():
        cells = []
        for m in METRICS:
            cell = f"{metrics[m]['mean']:.1f}" + (f"±{metrics[m]['std']:.1f}" if n_seeds > 1 else "")
            cells.append(cell.rjust(13))
        lines.append(row.ljust(width) + "".join(cells))
    return "\n".join(lines)


def format_markdown(table: dict, n_seeds: int) -> str:
    """The table as Markdown (mean, and ± sample std over seeds when there are several)."""
    lines = ["| row | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for row, metrics in table.items():
        cells = [f"{metrics[m]['mean']:.1f}" + (f" ± {metrics[m]['std']:.1f}" if n_seeds > 1 else "") for m in METRICS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(table: dict, path: Path, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    shown = ("R@1", "R@5", "Rs@1", "Rmean")
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(shown)
    for k, metric in enumerate(shown):
        means = [table[r][metric]["mean"] for r in rows]
        stds = [table[r][metric]["std"] for r in rows]
        ax.bar([i + k * width for i in range(len(rows))], means, width, yerr=stds if n_seeds > 1 else None,
               label=metric, capsize=2)
    ax.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels(rows, rotation=15, fontsize=8)
    ax.set_ylabel("recall (%)")
    ax.set_title(f"CLIP4Cir on the synthetic world, CIRR protocol, test split ({n_seeds} seed(s))")
    ax.legend(ncol=len(shown), fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def report_and_save(per_seed: dict, out: Path, *, budget: Budget, quick: bool, device: str, world_seed: int,
                    argv, step_seconds: dict, total: float) -> dict:
    """Print the table, write results.json and results.png into ``out``; returns the report."""
    seeds = sorted(per_seed)
    table = summarise({s: per_seed[s] for s in seeds})
    text = format_table(table, len(seeds))
    print()
    print(f"CLIP4Cir (tiny CLIP) on the synthetic world, CIRR protocol on the test split, "
          f"{len(seeds)} seed(s){' (mean±std over seeds)' if len(seeds) > 1 else ''}:")
    print(text)
    base = table["baseline"]["Rmean"]["mean"]
    print("Rmean vs baseline: " + ", ".join(f"{r} {table[r]['Rmean']['mean'] - base:+.1f}"
                                            for r in table if r != "baseline"))
    command = " ".join(["examples/quickstart.py"] + (sys.argv[1:] if argv is None else list(argv)))
    report = {"command": command, "seeds": seeds, "world_seed": world_seed, "device": device,
              "threads": torch.get_num_threads(), "budget": "quick" if quick else "default",
              "budget_values": budget.to_dict() if isinstance(budget, Budget) else budget,
              "rows": {r: {m: v["mean"] for m, v in metrics.items()} for r, metrics in table.items()},
              "spread": {r: {m: v["std"] for m, v in metrics.items()} for r, metrics in table.items()},
              "per_seed": {str(s): per_seed[s] for s in seeds}, "step_seconds": step_seconds,
              "total_seconds": total}
    out.mkdir(parents=True, exist_ok=True)
    atomic_json(out / "results.json", report)
    markdown = out / "results.md"
    tmp = markdown.with_name(f"results.md.tmp-{os.getpid()}")
    tmp.write_text(format_markdown(table, len(seeds)) + "\n")
    os.replace(tmp, markdown)
    bar_chart(table, out / "results.png", len(seeds))
    print(f"\ntotal {total:.1f}s")
    print(f"table: {out / 'results.json'}\nchart: {out / 'results.png'}")
    return report


def merge(dirs, out: Path, argv) -> int:
    """Combine single- or multi-seed results.json files that share a budget and a world into one table."""
    per_seed, budgets, worlds, quick, steps, total = {}, set(), set(), set(), {}, 0.0
    for folder in dirs:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise SystemExit(f"--merge: no results.json in {folder!r}; run the quickstart there first")
        report = json.loads(path.read_text())
        budgets.add(json.dumps(report["budget_values"], sort_keys=True))
        worlds.add(report["world_seed"])
        quick.add(report["budget"])
        for seed, value in report["per_seed"].items():
            if int(seed) in per_seed:
                raise SystemExit(f"--merge: seed {seed} appears twice (in {folder!r}); merge each seed once")
            per_seed[int(seed)] = value
        for name, seconds in report["step_seconds"].items():
            steps[name] = steps.get(name, 0.0) + seconds
        total += report["total_seconds"]
    if len(budgets) != 1 or len(worlds) != 1:
        raise SystemExit(f"--merge: the runs differ in budget or world seed ({len(budgets)} budgets, worlds "
                         f"{sorted(worlds)}); only runs of one configuration can be averaged")
    report_and_save(per_seed, out, budget=json.loads(budgets.pop()), quick=quick.pop() == "quick",
                    device="(merged)", world_seed=worlds.pop(), argv=argv, step_seconds=steps, total=total)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output directory (results.json, results.png, cache/)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...); >1 reports mean and spread")
    parser.add_argument("--seed", type=int, default=0, help="first training seed")
    parser.add_argument("--world-seed", type=int, default=0,
                        help="seed of the synthetic world and of the tiny CLIP's pretraining (shared by all seeds)")
    parser.add_argument("--quick", action="store_true", help="tiny budget for tests and CI (the numbers mean nothing)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                        help="instead of running: combine the results.json of runs of other seeds (same budget and "
                             "world) into one mean/spread table in --out (e.g. seeds run on different machines)")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but torch sees no CUDA GPU; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = BUDGETS["quick" if args.quick else "default"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    show = not args.no_progress
    clock = Clock()
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"quickstart: seeds {seeds}, budget {'quick' if args.quick else 'default'}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, out {out}", flush=True)
    per_seed = {}
    for seed in seeds:
        started = time.perf_counter()
        per_seed[seed] = run_seed(seed, budget, out, args.device, show, clock, world_seed=args.world_seed)
        per_seed[seed]["seconds"] = time.perf_counter() - started
        print(f"seed {seed} done in {per_seed[seed]['seconds']:.1f}s", flush=True)
    report_and_save(per_seed, out, budget=budget, quick=args.quick, device=args.device, world_seed=args.world_seed,
                    argv=argv, step_seconds=clock.steps, total=time.perf_counter() - clock.start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
