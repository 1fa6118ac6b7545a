"""Quickstart: the whole method on the embedded synthetic world, end to end, on a laptop CPU.

Measured results and costs are in benchmarks/RESULTS.md ("Quickstart") and the README.

    pip install -e . && python examples/quickstart.py            # world 0, one seed (world + tiny CLIP cached)
    python examples/quickstart.py --seeds 3                      # mean and spread over seeds 0, 1, 2
    python examples/quickstart.py --worlds 4 --seeds 2           # held-out worlds 1-4: the paired table with CIs
    python examples/quickstart.py --quick                        # a tiny budget (tests, CI)
    python examples/quickstart.py --device cuda --out runs/qs    # on a GPU, elsewhere

Selection protocol: world seed 0 is the tuning world. Every choice of budget, recipe and hyper-parameter is
made on its validation split (each training run also keeps its best epoch by val Rmean); test splits, and every
other world, are only reported. ``--worlds`` runs the same command on worlds nobody tuned on.

Steps (each prints its time; long ones show a progress bar):
  a. generate the synthetic world (cached under OUT/cache; 3% of its images are pixel-identical copies) and group
     the train images' duplicates (data.dedup): the bank has one row per group;
  b. pretrain a tiny transformers CLIPModel on the world's image-caption pairs (scenes.json), standing in
     for a pretrained VLM; saved with save_pretrained (+ a word-level tokenizer and an image processor)
     and loaded back by path, like a real checkpoint (cached);
  c. baseline: the CLIP4Cir example's stage 1 on the annotated triplets only (in-batch negatives, both towers,
     sum fusion, as the SPN release's CLIP4Cir);
  d. the rows (every train image captioned by SyntheticCaptioner with realistic noise, paired in a rank window,
     templated; a text longer than the text tower's 32 tokens replaced by the target caption alone):
     +N: stage 2 against the bank of every train image, from the baseline, on the annotated triplets;
     +P (paper) / +P+N (paper): the paper's recipe, mapped by the rule below; +P is the release's stage 2 with the
       bank switched off (in-batch negatives, both towers), +P+N its stage 2 with the bank, both from the baseline;
     +P / +P+N (ours, no rewrite): the library's defaults, what a user without an LLM gets: partners from the
       nearest 1% of each image's ranking, the same captions and templates, mixed into stage 1 from the start at an
       annotated share of 0.67, then stage 2 from that model;
     +P / +P+N (ours, oracle rewrite): the same with whole captions and texts rewritten by SyntheticRewriter, which
       parses the world's own scene grammar into relative edits. No real dataset has such an oracle: these rows
       bound what a good rewriter (cir_plugins.LLMRewriter with an instruct model) could add;
     zero-shot: the library's generated triplets only (stage 1 then stage 2); untrained: the pretrained CLIP alone;
  e. evaluate every row with the CIRR protocol on the test split; print one table; write results.json (with each
     query's ranks), results.md and results.png into OUT;
  f. the retrieval report (cir_plugins.report, the code behind `cir-plugins show`): OUT/report/report.png and
     report.html, the top 5 of +P+N and of the baseline for test queries +P+N wins and loses, target outlined.

Mapping rule for the "(paper)" rows. The release's data choices are kept, written as shares, fallbacks and
fractions so that they carry over to a world of another size; only what belongs to the tiny model is the world's:
  - annotated share 0.625 in every batch that mixes annotated and generated triplets. The release's CLIP4Cir CIRR
    run draws one partner per training image (at most 16,939 generated triplets) beside CIRR's 28,225 annotated
    ones and samples the union uniformly, so at least 28,225 / (28,225 + 16,939) = 62.5% of its samples are
    annotated. (This world has 1,000 annotated triplets beside 12,000 generated ones: sampled uniformly, as the
    previous mapping did, batches were 8% annotated, a share the release never trains at.)
  - text-length fallback: a templated text the text tower's tokenizer cannot take is replaced by the target
    caption alone (the release's rule), never cut in the middle of the target's description;
  - rank window [10000, 15000) of CIRR's 16,939 train images, as fractions of N: (0.590, 0.886);
  - templates "{T} instead of {R}" and "Unlike {R}, I want {T}", captions of at most 8 words (the release's
    CIRR prompt asks for 8), one partner per image, no rewrite;
  - +P (paper) is the positives-only ablation as the release can run it: its stage-2 script with the bank off
    (in-batch negatives, both towers trained) on annotated + generated triplets, from the stage-1 checkpoint. The
    paper's own ablation section was not at hand when this was written; the definition follows the release's
    switch for it, and Budget.paper_* documents each choice;
  - the tiny model's learning rates, step counts and temperatures are the same as every other row's, chosen on
    world 0's val split (see BUDGETS and benchmarks/RESULTS.md, "Selection protocol").

Threads: on the CPU, without --threads, the quickstart uses 2 threads while at least 1.5 cores are idle and 1
otherwise, looking again before every step, so a job that starts beside it (or ends) is seen. A second thread
makes this tiny model 1.45x faster on an idle CPU, but where other work shares the CPU torch's spinning threads
make each step slower than one thread would, and far slower on a busy machine (benchmarks/threads.py).

With --worlds, OUT/world<W>/ holds each world's results and OUT/heldout.json / .md / .png the table of each row's
Rmean difference to the baseline: mean, spread over runs and a 95% interval by a paired two-level bootstrap
(cir_plugins.stats.paired_bootstrap: runs, then queries), rewritten after every world.

Budgets are fixed before comparing rows (see BUDGETS): stage 1 of the baseline and the zero-shot row take the
same number of optimiser steps, and +P (ours) takes as many annotated samples as the baseline plus its generated
ones (annotated_fraction of each batch); every stage-2 run takes the same number of optimiser steps
(stage2_steps), so the stage-2 rows differ only in their training triplets and starting model. Every training
run, of every row, keeps its best epoch (val-checked round) by validation Rmean (CIRR protocol on the world's val
split), as the method does.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
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

import _tiny_clip  # noqa: E402
from model import CLIP4Cir  # noqa: E402
from wrap import wrap  # noqa: E402

import cir_plugins as cp  # noqa: E402
from cir_plugins._atomic import atomic_write_json  # noqa: E402
from cir_plugins.convert import save_safetensors  # noqa: E402
from cir_plugins.data.dedup import find_duplicates  # noqa: E402
from cir_plugins.data.images import ClipTransform  # noqa: E402
from cir_plugins.data.split import Split  # noqa: E402
from cir_plugins.data.synthetic import SyntheticCaptioner, SyntheticRewriter, load_scenes, make_world  # noqa: E402
from cir_plugins.evaluation import extract_features, metrics_from_features  # noqa: E402
from cir_plugins.positives.templates import resolve_templates  # noqa: E402
from cir_plugins.report import query_ranks, retrieval_report  # noqa: E402
from cir_plugins.stats import paired_bootstrap  # noqa: E402

logger = logging.getLogger("quickstart")

UNTRAINED = "untrained (pretrained CLIP, no CIR training)"
# the rows, in table order: first what a user can reproduce on real data, then the oracle rows, then the references.
#   "(paper)": the paper's recipe mapped onto the world by the rule in the module docstring (the release's data
#     choices kept as shares, fallbacks and fractions; only the tiny model's learning rates and steps are the world's);
#   "(ours, no rewrite)": this library's defaults, what a user without an LLM gets (near partners, templates, the
#     release's text-length fallback, generated triplets mixed into stage 1 from the start at a fixed annotated share);
#   "(ours, oracle rewrite)": the same with texts rewritten by SyntheticRewriter, which parses the world's own scene
#     grammar: an oracle no real dataset has, the ceiling of what a good rewriter (cir_plugins.LLMRewriter) could add.
PAPER_P, PAPER_PN = "+P (paper)", "+P+N (paper)"
OURS_P, OURS_PN = "+P (ours, no rewrite)", "+P+N (ours, no rewrite)"
ORACLE_P, ORACLE_PN = "+P (ours, oracle rewrite)", "+P+N (ours, oracle rewrite)"
ROWS = ("baseline", "+N", PAPER_P, PAPER_PN, OURS_P, OURS_PN, ORACLE_P, ORACLE_PN, "zero-shot", UNTRAINED)
# The release's CLIP4Cir CIRR run, as data: CIRR's train split has 16,939 images and 28,225 annotated triplets; the
# release draws one partner per training image (so at most 16,939 generated triplets) and samples uniformly over
# annotated + generated, so at least 28,225 / (28,225 + 16,939) = 62.5% of its samples are annotated. Its partners
# come from ranks [10000, 15000) of each image's ranking, its captions from an 8-word prompt, and a templated text
# that the tokenizer cannot take is replaced by the target caption alone.
CIRR_TRAIN_IMAGES = 16939
CIRR_ANNOTATED = 28225
PAPER_ANNOTATED_SHARE = CIRR_ANNOTATED / (CIRR_ANNOTATED + CIRR_TRAIN_IMAGES)
PAPER_RANK_WINDOW = (10000 / CIRR_TRAIN_IMAGES, 15000 / CIRR_TRAIN_IMAGES)
PAPER_CAPTION_WORDS = 8
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
    # the captioner's word budget ("describe the image in {k} words"; the release's CIRR prompt asks for 8): the
    # synthetic captioner then drops positions, sizes and colours as a terse captioner would. The oracle rows keep
    # whole captions (None): SyntheticRewriter matches objects by their positions
    caption_words: int | None = PAPER_CAPTION_WORDS
    # modification-text templates: a preset of cir_plugins.positives.templates ("cirr": the two CIRR ones)
    templates: str = "cirr"
    # generated texts over the tokenizer's limit: "target" = replaced by the target caption alone (the release's
    # rule and the library's default), "truncate" = cut by the tokenizer (the previous mapping of the paper rows)
    long_text: str = "target"
    # generated triplets kept (seeded subsample of one per train image; 12000 = all of them)
    max_generated: int = 12000
    # the oracle rows: texts rewritten by SyntheticRewriter (reads only the two noisy captions); pairs more than
    # rewrite_max_edits apart keep their template text
    rewrite_max_edits: int = 4
    # the paper's recipe (rows "(paper)"), mapped by the rule in the module docstring: the release's CIRR window
    # [10000, 15000) as fractions of CIRR's 16,939 train images, its two CIRR templates, its 8-word captions, no
    # rewrite, over-long texts replaced by the target caption, and its annotated share (at least 62.5%, see
    # PAPER_ANNOTATED_SHARE) in every batch that mixes annotated and generated triplets
    paper_rank_window: tuple = PAPER_RANK_WINDOW
    paper_templates: str = "cirr"
    paper_long_text: str = "target"
    paper_annotated_fraction: float | None = PAPER_ANNOTATED_SHARE
    # +P (paper) is the positives-only ablation as the release runs it: its stage-2 script with the bank switched off
    # (in-batch negatives, both towers trained) on annotated + generated triplets, from the stage-1 checkpoint, so it
    # takes the stage-2 budget (stage2_steps at stage2_lr in stage2_epochs val-checked rounds), as +P+N (paper) does
    # the row whose retrieval the picture compares with the baseline
    report_row: str = OURS_PN
    # retrieval report: queries shown (half +P+N's biggest wins over the baseline, half its biggest losses)
    report_queries: int = 8
    eval_batch: int = 512

    def __post_init__(self) -> None:
        steps, rounds = self.stage2_steps, self.stage2_epochs
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
                                  or steps % rounds):
            raise ValueError(f"Budget.stage2_steps={steps!r}: expected None or a positive multiple of "
                             f"stage2_epochs={rounds} (each val-checked round takes stage2_steps / stage2_epochs)")
        for name in ("long_text", "paper_long_text"):
            if getattr(self, name) not in ("target", "truncate"):
                raise ValueError(f"Budget.{name}={getattr(self, name)!r}: expected 'target' or 'truncate'")
        if self.report_row not in (PAPER_PN, OURS_PN, ORACLE_PN):
            raise ValueError(f"Budget.report_row={self.report_row!r}: expected one of {(PAPER_PN, OURS_PN, ORACLE_PN)}")

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
    """A line per step with its time, and the total. With ``adapt_threads``, the torch thread count is chosen
    again before every step (threads_for_this_cpu), so a job that starts beside the quickstart, or ends, is seen."""

    def __init__(self, adapt_threads: bool = False) -> None:
        self.start = time.perf_counter()
        self.steps: dict[str, float] = {}
        self.adapt_threads = adapt_threads

    def run(self, name: str, fn, *args, **kwargs):
        if self.adapt_threads:  # between steps this process is idle, so the sample sees only the other jobs
            threads = threads_for_this_cpu(seconds=0.25)
            if threads != torch.get_num_threads():
                print(f"     torch threads {torch.get_num_threads()} -> {threads} (idle cores changed)", flush=True)
                torch.set_num_threads(threads)
        started = time.perf_counter()
        print(f"  -> {name} ...", flush=True)
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - started
        self.steps[name] = self.steps.get(name, 0.0) + seconds
        print(f"  [{time.perf_counter() - self.start:7.1f}s] {name}: {seconds:.1f}s", flush=True)
        return out


def idle_cores(seconds: float = 0.5) -> float:
    """How many CPU cores were idle over the last ``seconds`` (from /proc/stat; elsewhere the cores minus the
    1-minute load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
        return (os.cpu_count() or cores) * (idle1 - idle0) / max(1, total1 - total0)
    except (OSError, ValueError, IndexError):
        return max(0.0, cores - os.getloadavg()[0]) if hasattr(os, "getloadavg") else 1.0


def threads_for_this_cpu(seconds: float = 0.5) -> int:
    """The quickstart's thread count: 2 when at least 1.5 cores are idle, else 1. On an idle 2-core CPU a second thread
    makes the tiny model's training steps 1.45x faster; beside another job it makes them 1.75x slower than one
    thread, and on a busier machine torch's spinning threads have cost far more (benchmarks/threads.py)."""
    return 2 if idle_cores(seconds) >= 1.5 else 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def preload(split: Split, ids, cache: Path, show_progress: bool) -> dict[str, torch.Tensor]:
    """id -> (3, S, S) targetpad tensors, decoded once and cached as safetensors."""
    from safetensors.torch import load_file

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
    save_safetensors({"images": images}, cache)
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

    Returns the extra config fields (where the best epoch's checkpoint goes) and the Evaluator; {} when selection
    is off (the last epoch is kept).
    """
    if not budget.select_on_val or val is None or out is None:
        return {}
    evaluator = cp.Evaluator.on_split(val, metric="Rmean", protocol="cirr", batch_size=budget.eval_batch,
                                      show_progress=False)
    return {"config": {"output_dir": str(out / name)}, "evaluator": evaluator}


def fit(trainer_cls, args: tuple, config_cls, config: dict, chosen: dict, *, val_log: dict | None = None,
        run_name: str = "run", **kwargs) -> tuple[object, list]:
    """Build and fit a trainer; with validation selection, fit() puts the best epoch's weights back (and every
    epoch's val Rmean goes into ``val_log[run_name]``: the numbers every choice is made on)."""
    config = config_cls(**{**config, **chosen.get("config", {})})
    trainer = trainer_cls(*args, config=config, evaluator=chosen.get("evaluator"), **kwargs)
    history = trainer.fit()  # with an evaluator: the best epoch's weights are restored (restore_best)
    if chosen:
        best = trainer.best_epoch - 1
        scores = ", ".join(f"{entry['metrics']['Rmean']:.1f}" for entry in history)
        print(f"     best epoch by val Rmean: {best + 1} of {len(history)} ({scores})", flush=True)
        if val_log is not None:
            val_log[run_name] = {"best_epoch": best + 1, "val_Rmean": [entry["metrics"]["Rmean"] for entry in history]}
    return trainer.model, history


def stage1(clip_dir: Path, triplets, images, budget: Budget, seed: int, device: str, *, steps: int,
           share: float | None, start: CLIP4Cir | None = None, show_progress: bool, val: Split | None = None,
           work: Path | None = None, run_name: str = "stage1", val_log: dict | None = None,
           epochs: int | None = None, lr: float | None = None) -> CLIP4Cir:
    """CLIP4Cir's own fine-tuning of both CLIP towers with in-batch negatives (Stage1Trainer), ``steps`` optimiser
    steps in ``epochs`` (default budget.stage1_epochs) val-checked epochs at ``lr`` (default budget.stage1_lr), from
    the pretrained CLIP or from a copy of ``start`` (a stage-1 checkpoint); ``share``: the annotated share of each
    batch (None: uniform over ``triplets``)."""
    model = load_model(clip_dir, device, budget.fusion) if start is None else copy.deepcopy(start).train()
    epochs = budget.stage1_epochs if epochs is None else epochs
    config = dict(epochs=epochs, steps_per_epoch=max(1, round(steps / epochs)), batch_size=budget.stage1_batch,
                  lr=budget.stage1_lr if lr is None else lr, temperature=budget.stage1_temperature,
                  annotated_fraction=share,
                  seed=seed, show_progress=show_progress)
    trainable = ["clip.text_model", "clip.text_projection", "clip.vision_model", "clip.visual_projection"]
    if budget.fusion == "combiner":
        trainable.append("combiner")
    chosen = selection(budget, val, run_name, work)
    fit(cp.Stage1Trainer, (model, triplets, images), cp.Stage1Config, config, chosen, trainable=trainable,
        val_log=val_log, run_name=run_name)
    return model.eval()


def stage2_share(budget: Budget) -> float:
    return budget.annotated_fraction if budget.stage2_annotated_fraction is None else budget.stage2_annotated_fraction


def stage2(model: CLIP4Cir, triplets, images, bank_ids, budget: Budget, seed: int, *, share: float | None,
           groups: dict[str, str], steps_per_epoch: int | None = None, show_progress: bool,
           val: Split | None = None, work: Path | None = None, run_name: str = "stage2",
           val_log: dict | None = None) -> tuple[object, int]:
    """The method's stage 2: the text tower against a static bank of every train image, one row per duplicate
    group (``groups``: id -> group id), so a pixel-identical copy of a target is never its negative."""
    wrapped = wrap(copy.deepcopy(model))
    bank = cp.NegativeBank.build(wrapped, bank_ids, images, groups=groups, batch_size=budget.eval_batch,
                                 show_progress=show_progress)
    print(f"     bank: {len(bank.embeddings)} rows for {len(bank_ids)} train images (one per duplicate group)",
          flush=True)
    if steps_per_epoch is None and budget.stage2_steps is not None:
        steps_per_epoch = budget.stage2_steps // budget.stage2_epochs  # a multiple (Budget checks it)
    config = dict(epochs=budget.stage2_epochs, batch_size=budget.stage2_batch, lr=budget.stage2_lr,
                  temperature=budget.stage2_temperature,
                  annotated_fraction=share,
                  steps_per_epoch=steps_per_epoch, seed=seed,
                  show_progress=show_progress)
    chosen = selection(budget, val, run_name, work)
    _, history = fit(cp.Stage2Trainer, (wrapped, bank, triplets, images), cp.Stage2Config, config, chosen,
                     val_log=val_log, run_name=run_name)
    return wrapped.eval(), sum(entry["steps"] for entry in history)


def augment(root: Path, clip_dir: Path, train: Split, images, budget: Budget, seed: int, device: str,
            show_progress: bool, *, recipe: str) -> tuple[list, dict]:
    """Generated triplets from every train image (annotated groups and unlabelled ones) by one of three recipes:
    "paper" (the release's window as fractions, its 8-word captions and templates, no rewrite), "ours" (near
    partners, 8-word captions, templates) or "oracle" (near partners, whole captions, SyntheticRewriter). A text
    longer than the text tower's limit is replaced by the target caption (budget.long_text / paper_long_text =
    "target"), as the release does, or cut by the tokenizer ("truncate"). Returns the triplets and the counts."""
    window = budget.paper_rank_window if recipe == "paper" else budget.rank_window
    templates = budget.paper_templates if recipe == "paper" else budget.templates
    long_text = budget.paper_long_text if recipe == "paper" else budget.long_text
    words = None if recipe == "oracle" else budget.caption_words
    encoder = load_model(clip_dir, device).eval()
    captioner = SyntheticCaptioner(root, noise=budget.caption_noise, seed=seed, words=words)
    # the text tower's limit in its own tokens (counted without the tokenizer's "longer than the maximum" warning)
    limit = {"max_tokens": encoder.max_length,
             "count_tokens": lambda text: len(encoder.tokenizer(text, verbose=False)["input_ids"])}
    rewriter = SyntheticRewriter(budget.rewrite_max_edits) if recipe == "oracle" else None
    config = cp.AugmentConfig(templates=templates, rank_window=tuple(window), partners_per_image=1, seed=seed,
                              max_triplets=budget.max_generated, batch_size=budget.eval_batch, fallback=long_text,
                              max_tokens=limit["max_tokens"], caption_batch_size=1000)
    augmenter = cp.TripletAugmenter(captioner, encoder.encode_image, config=config, rewriter=rewriter,
                                    count_tokens=limit["count_tokens"], show_progress=show_progress)
    result = augmenter.augment(list(train.gallery_ids), images, annotated=train.triplets)
    triplets = [t for t in result.triplets if t.source == "generated"]
    texts = sum(len(t.texts) for t in triplets)
    # every pair is templated once per template before the length rule: that is what over_limit counts against
    templated = result.summary["triplets_before_subsample"] * len(resolve_templates(templates))
    counts = {"triplets": len(triplets), "texts": texts, "templated_texts": templated,
              "over_limit": result.summary["text_fallbacks"], "long_text": long_text, "caption_words": words}
    if rewriter is not None:
        counts.update(rewritten=rewriter.rewritten, kept_templated=rewriter.kept)
    how = "replaced by the target caption" if long_text == "target" else "cut by the tokenizer"
    print(f"     {len(triplets)} triplets, {texts} texts; {counts['over_limit']} of {templated} templated texts over "
          f"the text tower's {encoder.max_length} tokens, {how}"
          + (f"; rewrite: {rewriter.rewritten} rewritten, {rewriter.kept} kept as templated" if rewriter else ""),
          flush=True)
    return triplets, counts


def evaluate(model, test: Split, budget: Budget, show_progress: bool) -> dict:
    """The CIRR protocol's metrics, and each query's target ranks (for the paired confidence intervals)."""
    features = extract_features(model, test, batch_size=budget.eval_batch, show_progress=show_progress)
    result = metrics_from_features(features, protocol="cirr")
    metrics = {k: float(result[k]) for k in METRICS}
    ranks = query_ranks(features, protocol="cirr")
    metrics["per_query"] = {"rank": ranks["rank"].tolist(), "subset_rank": ranks["subset_rank"].tolist()}
    print("     " + "  ".join(f"{k} {metrics[k]:.1f}" for k in METRICS), flush=True)
    return metrics


def run_seed(seed: int, budget: Budget, out: Path, device: str, show_progress: bool, clock: Clock, *,
             world_seed: int = 0, report_dir: Path | None = None) -> dict:
    """Every row for one training seed. The world and the pretrained CLIP (the 'dataset' and the 'public
    checkpoint') come from ``world_seed`` and are shared by all training seeds, as CIRR and CLIP are.
    With ``report_dir``, the retrieval report of +P+N (the default recipe's) against the baseline goes there."""
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    world = dict(budget.world)
    root = cache / f"world-{digest(world)}-seed{world_seed}"
    tag = f"world {world_seed} seed {seed}"
    clock.run(f"{tag}: a. synthetic world", make_world, root, seed=world_seed, size=world,
              show_progress=show_progress)
    transform = ClipTransform("targetpad", world["image_size"], mean=MEAN, std=STD)
    train = cp.load_cirr(root, "train", transform=transform)
    test_store = cp.load_cirr(root, "test", transform=transform)
    val = cp.load_cirr(root, "val", transform=transform) if budget.select_on_val else None
    images = clock.run(f"{tag}: a. decode images", lambda: {
        **preload(train, train.gallery_ids, root / "train-images.safetensors", show_progress),
        **preload(test_store, test_store.gallery_ids, root / "test-images.safetensors", show_progress),
        **(preload(val, val.gallery_ids, root / "val-images.safetensors", show_progress) if val else {})})
    test = dataclasses.replace(test_store, images={i: images[i] for i in test_store.gallery_ids})
    if val is not None:
        val = dataclasses.replace(val, images={i: images[i] for i in val.gallery_ids})
    # pixel-identical train images (the world's copies) share one bank row: a copy of a target is not its negative
    groups = clock.run(f"{tag}: a. duplicate groups", find_duplicates, list(train.gallery_ids), train.images,
                       show_progress=show_progress)
    work = out / "checkpoints" / f"world{world_seed}-seed{seed}"  # per-epoch checkpoints for the val choice
    clip_dir = clock.run(f"{tag}: b. pretrain tiny CLIP", make_clip, root, train, images, budget, cache,
                         world_seed, device, show_progress)
    annotated = [t for t in train.triplets if t.target is not None]
    bank_ids = list(train.gallery_ids)
    results, info = {}, {"train_images": len(bank_ids), "duplicate_groups": len(set(groups.values()))}
    val_log: dict = {}  # run -> its epochs' val Rmean (what the choices of this file were made on)
    common = dict(show_progress=show_progress, val=val, work=work, val_log=val_log)

    def row(name, model):
        results[name] = clock.run(f"{tag}: e. evaluate {name}", evaluate, model, test, budget, show_progress)

    row(UNTRAINED, load_model(clip_dir, device).eval())
    baseline = clock.run(f"{tag}: c. baseline stage 1", stage1, clip_dir, annotated, images, budget, seed, device,
                         steps=budget.stage1_steps, share=None, run_name="baseline", **common)
    row("baseline", baseline)
    plus_n, steps_n = clock.run(f"{tag}: d. +N stage 2", stage2, baseline, annotated, images, bank_ids, budget, seed,
                                share=None, groups=groups, run_name="plus_n", **common)
    row("+N", plus_n)
    del plus_n
    shown_model = None  # the model the retrieval picture shows (budget.report_row)
    generated, counts, steps2 = {}, {}, {"+N": steps_n}
    # the paper's recipe, as the release runs it: generated triplets appended after the stage-1 checkpoint, the
    # release's annotated share in every batch; +P without the bank, +P+N with it, both on the stage-2 budget
    generated["paper"], counts["paper"] = clock.run(
        f"{tag}: d. augment, paper's recipe (window {budget.paper_rank_window[0]:.3f}-{budget.paper_rank_window[1]:.3f}"
        f" of N, {budget.caption_words}-word captions, templates, no rewrite)", augment, root, clip_dir, train,
        images, budget, seed, device, show_progress, recipe="paper")
    paper_set, share = annotated + generated["paper"], budget.paper_annotated_fraction
    # the stage-2 budget: stage2_steps, or (None) stage2_epochs passes over its triplets, as stage2() takes them
    paper_steps = budget.stage2_steps or budget.stage2_epochs * -(-len(paper_set) // budget.stage2_batch)
    model = clock.run(f"{tag}: d. {PAPER_P}: in-batch negatives from the baseline", stage1, clip_dir, paper_set,
                      images, budget, seed, device, steps=paper_steps, epochs=budget.stage2_epochs,
                      lr=budget.stage2_lr, share=share, start=baseline, run_name="plus_p_paper", **common)
    row(PAPER_P, model)
    del model
    model, steps2[PAPER_PN] = clock.run(f"{tag}: d. {PAPER_PN}: stage 2 from the baseline", stage2, baseline,
                                        paper_set, images, bank_ids, budget, seed, share=share, groups=groups,
                                        run_name="plus_pn_paper", **common)
    row(PAPER_PN, model)
    if budget.report_row == PAPER_PN:
        shown_model = model
    del model
    # our recipe, without and with the oracle rewrite: near partners, mixed into stage 1 from the start at the
    # annotated share, then stage 2 from that model
    plus_p_steps = round(budget.stage1_steps / budget.annotated_fraction)
    for recipe, (name_p, name_pn), run in (("ours", (OURS_P, OURS_PN), "ours"),
                                           ("oracle", (ORACLE_P, ORACLE_PN), "oracle")):
        generated[recipe], counts[recipe] = clock.run(
            f"{tag}: d. augment, {'our recipe' if recipe == 'ours' else 'our recipe + the oracle rewrite'}",
            augment, root, clip_dir, train, images, budget, seed, device, show_progress, recipe=recipe)
        plus_p = clock.run(f"{tag}: d. {name_p} stage 1", stage1, clip_dir, annotated + generated[recipe], images,
                           budget, seed, device, steps=plus_p_steps, share=budget.annotated_fraction,
                           run_name=f"plus_p_{run}", **common)
        row(name_p, plus_p)
        model, steps2[name_pn] = clock.run(
            f"{tag}: d. {name_pn} stage 2",
            stage2,
            plus_p,
            annotated + generated[recipe],
            images,
            bank_ids,
            budget,
            seed,
            share=stage2_share(budget),
            groups=groups,
            run_name=f"plus_pn_{run}",
            **common,
        )
        del plus_p
        row(name_pn, model)
        if budget.report_row == name_pn:
            shown_model = model
        del model
    # zero-shot: the library's generated triplets only (no annotated ones), stage 1 then stage 2
    zero1 = clock.run(f"{tag}: d. zero-shot stage 1", stage1, clip_dir, generated["ours"], images, budget, seed, device,
                      steps=budget.stage1_steps, share=None, run_name="zero1", **common)
    zero, _ = clock.run(f"{tag}: d. zero-shot stage 2", stage2, zero1, generated["ours"], images, bank_ids, budget,
                        seed, share=None, groups=groups, run_name="zero2", **common)
    row("zero-shot", zero)
    if report_dir is not None:
        name = budget.report_row
        shown = clock.run(f"{tag}: f. retrieval report", retrieval_report, shown_model, test, report_dir,
                          compare=baseline, names=(name, "baseline"), k=5, n_queries=budget.report_queries,
                          images=test_store.images, batch_size=budget.eval_batch,
                          title=f"Synthetic world {world_seed}, test split, seed {seed}: {name} vs baseline, top 5")
        info["report"] = {"html": str(shown.html), "png": str(shown.png), "wins": len(shown.wins),
                          "losses": len(shown.losses), "row": name}
        print(f"     retrieval report: {shown.png} and {shown.html} ({name} wins {len(shown.wins)} queries over "
              f"the baseline, loses {len(shown.losses)})", flush=True)
    del shown_model
    info["val"] = val_log
    info["generated"] = counts
    info["annotated_triplets"] = len(annotated)
    info["annotated_share"] = {"paper": budget.paper_annotated_fraction, "ours": budget.annotated_fraction}
    info["stage2_steps"] = steps2
    info["stage1_steps"] = {"baseline": budget.stage1_steps, "zero-shot": budget.stage1_steps,
                            PAPER_P: f"baseline + {paper_steps}", OURS_P: plus_p_steps, ORACLE_P: plus_p_steps}
    results = {name: results[name] for name in ROWS if name in results}  # table order
    per_query = {name: metrics.pop("per_query") for name, metrics in results.items()}
    return {"rows": results, "per_query": per_query, "info": info}


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
    ax.set_xticklabels([r.replace(" (", "\n(", 1) for r in rows], fontsize=8)
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
    atomic_write_json(out / "results.json", report, indent=2)
    markdown = out / "results.md"
    tmp = markdown.with_name(f"results.md.tmp-{os.getpid()}")
    tmp.write_text(format_markdown(table, len(seeds)) + "\n")
    os.replace(tmp, markdown)
    bar_chart(table, out / "results.png", len(seeds))
    print(f"\ntotal {total:.1f}s")
    print(f"table: {out / 'results.json'}\nchart: {out / 'results.png'}")
    return report


# ------------------------------------------------------------------------------------------ held-out worlds
def query_rmean(per_query: dict) -> np.ndarray:
    """Each query's share of Rmean = (R@5 + Rs@1) / 2, in percent: 50 * (hit@5 + subset hit@1); its mean is Rmean."""
    rank, subset = np.asarray(per_query["rank"]), np.asarray(per_query["subset_rank"])
    return 50.0 * ((rank < 5).astype(float) + (subset < 1).astype(float))


def heldout_table(runs: dict[tuple[int, int], dict], *, n_boot: int = 2000) -> dict:
    """Per row: mean Rmean, and its difference to the baseline over the runs (world, training seed): mean, spread
    (sample std of the per-run differences), 95% interval by the paired two-level bootstrap (runs, then the
    queries of each run; both rows of a run answer the same queries), per-world mean and the worlds above zero."""
    keys = sorted(runs)
    table = {}
    for name in ROWS:
        if not all(name in runs[k]["per_query"] for k in keys):
            continue
        values = [query_rmean(runs[k]["per_query"][name]) for k in keys]
        entry = {"Rmean": float(np.mean([v.mean() for v in values])),
                 "per_run": {f"world {w} seed {s}": float(v.mean()) for (w, s), v in zip(keys, values)}}
        if name != "baseline":
            diffs = [v - query_rmean(runs[k]["per_query"]["baseline"]) for k, v in zip(keys, values)]
            boot = paired_bootstrap(diffs, n_boot=n_boot, seed=0)
            worlds = sorted({w for w, _ in keys})
            per_world = {w: float(np.mean([d.mean() for (kw, _), d in zip(keys, diffs) if kw == w])) for w in worlds}
            entry.update({"diff": boot.mean, "spread": boot.spread, "low": boot.low, "high": boot.high,
                          "level": boot.level, "per_world": {str(w): v for w, v in per_world.items()},
                          "worlds_above_zero": sum(v > 0 for v in per_world.values()), "worlds": len(worlds)})
        table[name] = entry
    return table


def format_heldout(table: dict, runs: list) -> str:
    """The held-out table as Markdown."""
    worlds = sorted({w for w, _ in runs})
    seeds = sorted({s for _, s in runs})
    head = ("| row | Rmean | vs baseline | spread | 95% CI | worlds > 0 | "
            + " | ".join(f"world {w}" for w in worlds) + " |")
    lines = [f"{len(worlds)} held-out world(s) {worlds} x {len(seeds)} training seed(s) {seeds}: Rmean on each "
             "world's test split; difference to the baseline paired by world, seed and query; spread = sample std "
             "of the per-run differences; 95% CI = two-level bootstrap (runs, then queries).", "",
             head, "|---|" + "---:|" * (5 + len(worlds))]
    for name, entry in table.items():
        if name == "baseline":
            lines.append(f"| baseline | {entry['Rmean']:.1f} | | | | | " + " | ".join("" for _ in worlds) + " |")
            continue
        lines.append(f"| {name} | {entry['Rmean']:.1f} | {entry['diff']:+.1f} | {entry['spread']:.1f} | "
                     f"[{entry['low']:+.1f}, {entry['high']:+.1f}] | {entry['worlds_above_zero']}/{entry['worlds']} | "
                     + " | ".join(f"{entry['per_world'][str(w)]:+.1f}" for w in worlds) + " |")
    return "\n".join(lines)


def heldout_chart(table: dict, path: Path, n_runs: int) -> None:
    """Bars of each row's Rmean difference to the baseline, with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r != "baseline"]
    diffs = [table[r]["diff"] for r in rows]
    errors = [[d - table[r]["low"] for r, d in zip(rows, diffs)], [table[r]["high"] - d for r, d in zip(rows, diffs)]]
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar(range(len(rows)), diffs, yerr=errors, capsize=4, color=["#4c72b0" if d >= 0 else "#c44e52" for d in diffs])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.replace(" (", "\n(", 1) for r in rows], fontsize=8)
    ax.set_ylabel("Rmean minus baseline (points)")
    ax.set_title(f"Held-out synthetic worlds: difference to the baseline, 95% CI ({n_runs} runs)")
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def collect_heldout(out: Path, budget: Budget) -> dict[tuple[int, int], dict]:
    """Every finished held-out run under ``out`` (OUT/world<W>/results.json of this budget, W != 0), so that
    processes sharing one OUT (e.g. worlds 1,2 and 3,4 run side by side) each write the table of all of them."""
    runs = {}
    wanted = json.loads(json.dumps(budget.to_dict()))
    for path in sorted(out.glob("world*/results.json")):
        report = json.loads(path.read_text())
        if report.get("world_seed", 0) == 0 or report.get("budget_values") != wanted:
            continue
        for seed, value in report["per_seed"].items():
            runs[(int(report["world_seed"]), int(seed))] = value
    return runs


def save_heldout(runs: dict, out: Path, *, budget: Budget, quick: bool, argv, seconds: float) -> dict:
    """Write heldout.json / heldout.md / heldout.png for the runs so far (called after every world)."""
    keys = sorted(runs)
    table = heldout_table(runs)
    text = format_heldout(table, keys)
    print("\n" + text, flush=True)
    command = " ".join(["examples/quickstart.py"] + (sys.argv[1:] if argv is None else list(argv)))
    report = {
        "command": command,
        "runs": [{"world": w, "seed": s} for w, s in keys],
        "threads": torch.get_num_threads(),
        "budget": "quick" if quick else "default",
        "budget_values": budget.to_dict(),
        "table": table,
        "rows": {f"world {w} seed {s}": runs[(w, s)]["rows"] for w, s in keys},
        "seconds": seconds,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "heldout.json", report, indent=2)
    tmp = out / f"heldout.md.tmp-{os.getpid()}"
    tmp.write_text(text + "\n")
    os.replace(tmp, out / "heldout.md")
    heldout_chart(table, out / "heldout.png", len(keys))
    print(f"held-out table: {out / 'heldout.json'}, {out / 'heldout.md'}, {out / 'heldout.png'}", flush=True)
    return report


def parse_worlds(text: str) -> list[int]:
    """``--worlds``: a count K (world seeds 1..K) or a comma-separated list of world seeds ("7," is world 7 alone);
    0 (the tuning world) is refused."""
    text = text.strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise ValueError(f"--worlds {text}: expected a count >= 1 or a list of world seeds")
        return list(range(1, count + 1))
    try:
        worlds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--worlds {text!r}: expected a count (e.g. 4) or world seeds (e.g. 11,23,37)") from None
    if not worlds or len(set(worlds)) != len(worlds) or any(w < 0 for w in worlds):
        raise ValueError(f"--worlds {text!r}: expected distinct non-negative world seeds")
    if 0 in worlds:
        raise ValueError("--worlds: world 0 is the tuning world (every choice was made on its val split); held-out "
                         "worlds exclude it")
    return worlds


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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 2 while at least 1.5 cores are idle, else 1, looked at again "
                             "before every step: a second thread makes this tiny model 1.45x faster on an idle CPU, "
                             "and 1.75x slower than one thread beside another job, benchmarks/threads.py; "
                             "0 = torch's own choice)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are off anyway when stderr is not a terminal)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                        help="instead of running: combine the results.json of runs of other seeds (same budget and "
                             "world) into one mean/spread table in --out (e.g. seeds run on different machines)")
    parser.add_argument("--worlds", default=None, metavar="K|W1,W2,...",
                        help="run on held-out worlds instead of the tuning world 0: a count K (world seeds 1..K) or a "
                             "list of world seeds; writes OUT/world<W>/ per world and the table of each row's "
                             "difference to the baseline with 95%% intervals (OUT/heldout.json, .md, .png), updated "
                             "after every world")
    parser.add_argument("--no-report", action="store_true", help="skip the retrieval report (report/ in OUT)")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    worlds = None
    if args.worlds is not None:
        try:
            worlds = parse_worlds(args.worlds)
        except ValueError as error:
            parser.error(str(error))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but torch sees no CUDA GPU; use --device cpu")
    if args.threads is not None and args.threads < 0:
        parser.error(f"--threads must be >= 0 (0 = torch's own choice), got {args.threads}")
    adapt_threads = args.threads is None and args.device == "cpu"
    if adapt_threads:
        args.threads = threads_for_this_cpu()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = BUDGETS["quick" if args.quick else "default"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    show = not args.no_progress and sys.stderr.isatty()  # no bars filling a log file
    if not show:  # transformers' own "Loading weights" bar too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    clock = Clock(adapt_threads=adapt_threads)
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"quickstart: seeds {seeds}, worlds {worlds if worlds else [args.world_seed]}, budget "
          f"{'quick' if args.quick else 'default'}, device {args.device}, torch threads {torch.get_num_threads()} "
          f"(--threads N to change; 1 stays fast on a CPU other work shares), out {out}", flush=True)
    runs = {}
    for world_seed in (worlds or [args.world_seed]):
        per_seed = {}
        for seed in seeds:
            started = time.perf_counter()
            first = not runs and not per_seed and not args.no_report
            per_seed[seed] = run_seed(seed, budget, out, args.device, show, clock, world_seed=world_seed,
                                      report_dir=out / "report" if first else None)
            per_seed[seed]["seconds"] = time.perf_counter() - started
            print(f"world {world_seed} seed {seed} done in {per_seed[seed]['seconds']:.1f}s", flush=True)
            runs[(world_seed, seed)] = per_seed[seed]
            if worlds:  # written after every seed, so a run cut short keeps what finished
                # OUT/world<W>/ (first seed 0) or OUT/world<W>-seed<S>/: runs of other seeds can share OUT and its cache
                folder = f"world{world_seed}" if args.seed == 0 else f"world{world_seed}-seed{args.seed}"
                report_and_save(per_seed, out / folder, budget=budget, quick=args.quick,
                                device=args.device, world_seed=world_seed, argv=argv, step_seconds=clock.steps,
                                total=time.perf_counter() - clock.start)
                save_heldout(collect_heldout(out, budget), out, budget=budget, quick=args.quick, argv=argv,
                             seconds=time.perf_counter() - clock.start)
        if not worlds:
            report_and_save(per_seed, out, budget=budget, quick=args.quick, device=args.device,
                            world_seed=world_seed, argv=argv, step_seconds=clock.steps,
                            total=time.perf_counter() - clock.start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
