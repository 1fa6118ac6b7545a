"""What issue 18's content checks cost: a bank's checksum and unit-row check at save / load, and a
checkpoint's file hashes and state checksum at save / load, each against the plain safetensors calls on
the same tensors without any check: ``save_file`` then an fsync of the file (both durable), and
``load_file`` with every tensor read once (``clone``; safetensors maps the file lazily otherwise).

    python benchmarks/reliability_checksums.py --rows 100000 --dim 512 --params 4000000 --repeats 3 \
        --out benchmarks/reliability_checksums.json

Prints a table (median seconds of ``--repeats`` runs, and the checked / plain ratio) and writes JSON.
Files go to a temporary folder on the same disk as ``--tmp`` (default: the system's).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import record_header, write_json  # noqa: E402

from cir_plugins.negatives.bank import NegativeBank  # noqa: E402
from cir_plugins.negatives.bank_format import check_unit_rows, checksum  # noqa: E402
from cir_plugins.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def _plain_save(tensors: dict, path: Path) -> None:
    save_file(tensors, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _plain_load(path: Path) -> dict:
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--params", type=int, default=4_000_000, help="trainable parameters in the checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        folder = Path(folder)
        for dtype in (torch.float32, torch.bfloat16):
            emb = F.normalize(torch.randn(args.rows, args.dim), dim=-1).to(dtype)
            bank = NegativeBank(emb, [f"im{i}" for i in range(args.rows)], list(range(args.rows)), similarity="dot",
                                fingerprint="bench")
            checked, plain = folder / "bank.safetensors", folder / "plain.safetensors"
            name = f"bank {args.rows} x {args.dim} {str(dtype).replace('torch.', '')}"
            rows.append((f"{name}: save", _median(lambda: bank.save(checked), args.repeats),
                         _median(lambda: _plain_save({"embeddings": emb}, plain), args.repeats)))
            plain_load = _median(lambda: _plain_load(plain), args.repeats)
            rows.append((f"{name}: load", _median(lambda: NegativeBank.load(checked), args.repeats), plain_load))
            # the two checks alone, against the same plain load
            meta = bank.metadata()
            rows.append((f"{name}: checksum alone", _median(lambda: checksum(emb, meta), args.repeats), plain_load))
            rows.append((f"{name}: unit-row check alone", _median(lambda: check_unit_rows(emb, "bench"), args.repeats),
                         plain_load))
        weights = {f"layer{k}.weight": torch.randn(args.params // 20) for k in range(20)}
        optimizer = {"state": {k: {"step": torch.tensor(10.0), "exp_avg": torch.randn(args.params // 20),
                                   "exp_avg_sq": torch.rand(args.params // 20)} for k in range(20)},
                     "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": list(range(20))}]}
        state = {"stage": "stage2", "config": {}, "trainable": list(weights), "epoch": 1, "micro": 0,
                 "global_step": 10, "epoch_stats": {"loss_sum": 0.0, "micro_batches": 0, "steps": 0, "samples": 0,
                                                    "time": 0.0},
                 "history": [], "best": None, "rng": {}, "scheduler": None, "scaler": None}
        opt_flat = {f"state.{k}.{key}": v for k, entry in optimizer["state"].items() for key, v in entry.items()}

        def plain_save():
            _plain_save(weights, folder / "w.safetensors")
            _plain_save(opt_flat, folder / "o.safetensors")

        def plain_load():
            _plain_load(folder / "w.safetensors")
            _plain_load(folder / "o.safetensors")

        # the path re-check at every image read (issue 18 item 10) against the read it guards
        from PIL import Image

        from cir_plugins.data.images import ImageStore, resolve_under_root

        (folder / "imgs/a/b").mkdir(parents=True)
        Image.new("RGB", (500, 375), (90, 40, 200)).save(folder / "imgs/a/b/x.jpg")
        store = ImageStore(folder / "imgs", {"x": "a/b/x.jpg"}, "clip", size=224)
        reads = 200
        read_s = _median(lambda: [store["x"] for _ in range(reads)], args.repeats) / reads
        check_s = _median(lambda: [resolve_under_root(store.root, "a/b/x.jpg", what="x") for _ in range(reads)],
                          args.repeats) / reads
        rows.append(("image read 500x375 JPEG -> clip 224: path re-check alone", check_s, read_s))

        name = f"checkpoint {args.params / 1e6:g}M params + AdamW state"
        rows.append((f"{name}: save", _median(lambda: save_checkpoint(folder / "ckpt", "last", weights=weights,
                                                                      optimizer_state=optimizer, state=state),
                                              args.repeats), _median(plain_save, args.repeats)))
        rows.append((f"{name}: load", _median(lambda: load_checkpoint(folder / "ckpt", "last"), args.repeats),
                     _median(plain_load, args.repeats)))
    print(f"{'what':<52} {'checked s':>10} {'plain s':>10} {'ratio':>7}")
    for what, checked_s, plain_s in rows:
        print(f"{what:<52} {checked_s:>10.3f} {plain_s:>10.3f} {checked_s / plain_s:>7.2f}")
    if args.out:
        write_json(
            args.out,
            {
                **record_header("reliability_checksums"),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "settings": vars(args),
                "rows": [{"what": w, "checked_s": c, "plain_s": p, "ratio": c / p} for w, c, p in rows],
            },
        )


if __name__ == "__main__":
    main()
