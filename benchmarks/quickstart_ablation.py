"""Which of the paper mapping's data choices decides +P+N (paper) on the tuning world: share x captions x window.

Every variant is +P+N (paper) as the quickstart runs it (stage 2 from the baseline on annotated + generated
triplets, the quickstart's default budget), with one or more of the release's data choices swapped:

- share: the annotated share of each batch, the release's 0.625 or uniform over the union ("uniform": 8% here);
- captions: 8-word captions (the release's prompt) or whole scene captions, whose templated texts exceed the text
  tower's 32 tokens and are then replaced by the target caption ("whole, target") or cut ("whole, truncate");
- window: the release's far window (0.590, 0.886) of N, or the nearest 1% (0, 0.01).

Read on world 0's **val** split only (the best val-checked round's Rmean, as every training run keeps), training
seed 0; +N and the baseline of the same run are printed for reference. Writes a table and JSON.

    python benchmarks/quickstart_ablation.py --out runs/ablation      # reuses OUT/cache (world + tiny CLIP)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import quickstart as q  # noqa: E402

# benchmarks/_common.py by path: the quickstart puts examples/clip4cir (which has its own _common) on sys.path
_spec = importlib.util.spec_from_file_location("benchmarks_common", HERE / "_common.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
record_header, write_json = _bench.record_header, _bench.write_json

SHARES = {"0.625 (release)": q.PAPER_ANNOTATED_SHARE, "uniform": None}
CAPTIONS = {"8-words": (q.PAPER_CAPTION_WORDS, "target"), "whole-target": (None, "target"),
            "whole-truncate": (None, "truncate")}
WINDOWS = {"far (release)": q.PAPER_RANK_WINDOW, "near 1%": (0.0, 0.01)}


def best_val(val_log: dict, run: str) -> float:
    return max(val_log[run]["val_Rmean"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation", help="work folder (cache/, checkpoints/) and JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the quick budget (tests)")
    parser.add_argument("--captions", default="8-words,whole-target",
                        help="caption variants crossed with share and window (comma list of: 8-words (the release's), "
                             "whole-target, whole-truncate); whole-truncate also runs once at the release's share and "
                             "window")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    budget = q.BUDGETS["quick" if args.quick else "default"]
    world = dict(budget.world)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    q.seed_everything(args.seed)
    root = cache / f"world-{q.digest(world)}-seed0"
    q.make_world(root, seed=0, size=world, show_progress=False)
    transform = q.ClipTransform("targetpad", world["image_size"], mean=q.MEAN, std=q.STD)
    train = q.cp.load_cirr(root, "train", transform=transform)
    val = q.cp.load_cirr(root, "val", transform=transform)
    images = {**q.preload(train, train.gallery_ids, root / "train-images.safetensors", False),
              **q.preload(val, val.gallery_ids, root / "val-images.safetensors", False)}
    val = dataclasses.replace(val, images={i: images[i] for i in val.gallery_ids})
    groups = q.find_duplicates(list(train.gallery_ids), train.images, show_progress=False)
    clip_dir = q.make_clip(root, train, images, budget, cache, 0, "cpu", False)
    annotated = [t for t in train.triplets if t.target is not None]
    bank_ids = list(train.gallery_ids)
    val_log: dict = {}
    common = dict(show_progress=False, val=val, work=out / "checkpoints", val_log=val_log)
    baseline = q.stage1(clip_dir, annotated, images, budget, args.seed, "cpu", steps=budget.stage1_steps, share=None,
                        run_name="baseline", **common)
    q.stage2(baseline, annotated, images, bank_ids, budget, args.seed, share=None, groups=groups,
             run_name="plus_n", **common)
    crossed = [c.strip() for c in args.captions.split(",") if c.strip()]
    unknown = [c for c in crossed if c not in CAPTIONS]
    if unknown:
        parser.error(f"--captions: unknown {unknown}; expected some of {list(CAPTIONS)}")
    variants = list(itertools.product(SHARES, crossed, WINDOWS))
    if ("0.625 (release)", "whole-truncate", "far (release)") not in variants:
        variants.append(("0.625 (release)", "whole-truncate", "far (release)"))
    rows = []
    for share, captions, window in variants:
        words, long_text = CAPTIONS[captions]
        varied = dataclasses.replace(budget, caption_words=words, paper_long_text=long_text,
                                     paper_rank_window=WINDOWS[window], paper_annotated_fraction=SHARES[share])
        started = time.perf_counter()
        generated, counts = q.augment(root, clip_dir, train, images, varied, args.seed, "cpu", False, recipe="paper")
        name = f"pn[{share}|{captions}|{window}]"
        q.stage2(baseline, annotated + generated, images, bank_ids, varied, args.seed, share=SHARES[share],
                 groups=groups, run_name=name, **common)
        rows.append({"share": share, "captions": captions, "window": window, "val_Rmean": best_val(val_log, name),
                     "over_limit": counts["over_limit"], "templated_texts": counts["templated_texts"],
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    base, plus_n = best_val(val_log, "baseline"), best_val(val_log, "plus_n")
    print(f"\nworld 0 val, seed {args.seed}: baseline {base:.1f}, +N {plus_n:.1f}")
    print("| share | captions | window | +P+N val Rmean | vs +N | texts over 32 tokens |")
    print("|---|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['share']} | {row['captions']} | {row['window']} | {row['val_Rmean']:.1f} | "
              f"{row['val_Rmean'] - plus_n:+.1f} | {row['over_limit']} of {row['templated_texts']} |")
    write_json(str(out / "ablation.json"), {**record_header("quickstart_ablation"), "split": "val", "world": 0,
                                             "seed": args.seed, "baseline_val_Rmean": base, "plus_n_val_Rmean": plus_n,
                                             "rows": rows, "val_log": val_log})
    return 0


if __name__ == "__main__":
    sys.exit(main())
