"""Evaluate a CLIP4Cir checkpoint with the exact protocol of its dataset; or write the CIRR test-server files.

    python examples/clip4cir/evaluate.py --dataset cirr --root DATA/cirr --checkpoint runs/clip4cir-cirr/spn
    python examples/clip4cir/evaluate.py --dataset cirr --root DATA/cirr --checkpoint runs/clip4cir-cirr/spn \
        --split test1 --submit runs/clip4cir-cirr/submission
    python examples/clip4cir/evaluate.py --dataset fashioniq --root DATA/fashioniq --checkpoint ...

CIRR / synthetic: R@1/5/10/50, Rs@1/2/3, Rmean, reference removed. FashionIQ: per category and Avg R@10/R@50,
reference kept (the standard protocol, as the original CLIP4Cir code; ``--remove-reference``: as the method's
release evaluated its CLIP4Cir rows, which the published CLIP4Cir FashionIQ numbers and the recipe
clip4cir-fashioniq use).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

import cir_plugins as cp  # noqa: E402
from cir_plugins.submission import submit_cirr  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, or a CLIP hub name / path")
    parser.add_argument("--fusion", choices=("combiner", "sum"), default=None, help="override the saved fusion")
    parser.add_argument("--split", default=None, help="default: val (CIRR, FashionIQ), test (synthetic)")
    parser.add_argument("--remove-reference", action="store_true",
                        help="FashionIQ: remove the reference from the gallery (the release's CLIP4Cir rows)")
    parser.add_argument("--submit", default=None, help="CIRR test1: write the two server files into this folder")
    parser.add_argument("--json", default=None, help="write the metrics here")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging(args.verbose)
    start = time.perf_counter()
    model = C.load_checkpoint(args.checkpoint, fusion=args.fusion, device=args.device).eval()
    split_name = args.split or C.EVAL_SPLIT[args.dataset]
    splits = C.load_splits(args.dataset, args.root, split_name, C.targetpad(model), world_size=args.world_size)
    if args.submit:
        recall, subset = submit_cirr(model, splits[0], args.submit, batch_size=args.batch_size_eval,
                                        show_progress=not args.no_progress)
        print(f"CIRR submission: {recall}  {subset}")
        return 0
    kwargs = {"remove_reference": True} if args.remove_reference else {}
    if len(splits) == 1:
        result = cp.evaluate(model, splits[0], batch_size=args.batch_size_eval, show_progress=not args.no_progress,
                             **kwargs)
    else:
        result = cp.evaluate(model, splits, batch_size=args.batch_size_eval, show_progress=not args.no_progress,
                             **kwargs)
    print(f"{args.dataset} {split_name} ({args.checkpoint}, fusion {model.fusion}): {C.headline(result)}")
    if args.json:
        C.write_json(args.json, result)
    print(f"({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
