"""Bank building at the speed of the encoder: NegativeBank.build vs the bare encoder forward.

A CLIP ViT image tower is built from a transformers config (random weights: no download),
saved with save_pretrained into a temporary folder and loaded back by path. The images come from
``--source``: "tensors" (a dict id -> (3, H, W) float tensor in host memory) or "imagestore" (JPEG
files written to a temporary folder, read through cp.ImageStore with the "clip" transform: decode,
resize, crop, normalise in the DataLoader workers, as a real gallery is read). They are encoded by

  build        cp.NegativeBank.build(model, ids, images, batch_size, device, dtype, num_workers)
               (workers, pinned memory, the next batch copied on a side stream)
  bare_host    the encoder alone, batches stacked from the same preprocessed tensors and copied
  bare_device  the encoder alone on batches already on the device (the encoder's ceiling; the
               images are preprocessed and moved there once, outside the timing)

all under no_grad (bf16 autocast on CUDA, as build does). Reports images/s and build / bare.

    python benchmarks/bank_build.py --preset tiny --device cpu --out benchmarks/bank_build_cpu.json
    python benchmarks/bank_build.py --preset vitb16 --device cuda --out benchmarks/bank_build_gpu.json
    python benchmarks/bank_build.py --preset vitb16 --device cuda --source imagestore --images 4096 \
        --rounds 5 --num-workers 16 --out benchmarks/bank_build_gpu.json       # issue 20's row

The goal of issue 20: build >= 0.9 x bare_device images/s (``build_vs_bare_device`` in the JSON).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import record_header, write_json  # noqa: E402

from cir_plugins.negatives.bank import NegativeBank  # noqa: E402

PRESETS = {
    # hidden, layers, heads, image, patch, projection
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                 image_size=64, patch_size=16, projection_dim=64),
    "vitb16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   image_size=224, patch_size=16, projection_dim=512),
}


class TowerModel(nn.Module):
    """Target side: a CLIP vision tower + projection; query side: a bag of hashed words added to it."""

    similarity = "dot"

    def __init__(self, tower: nn.Module, dim: int, buckets: int = 997) -> None:
        super().__init__()
        self.tower = tower
        self.words = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.buckets = buckets

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> (N, D) projected image embeddings."""
        return self.tower(pixel_values=images).image_embeds

    def compose_query(self, reference: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """reference (B, 3, H, W), B texts -> (B, D)."""
        ids, offsets = [], []
        for text in texts:
            offsets.append(len(ids))
            ids.extend(hash(w) % self.buckets for w in (text.split() or [""]))
        dev = reference.device
        text = self.words(torch.tensor(ids, device=dev), torch.tensor(offsets, device=dev))  # (B, D)
        return F.normalize(self.encode_image(reference).detach() + text, dim=-1)


def load_tower(preset: str, folder: str) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**PRESETS[preset])).save_pretrained(folder)
    return CLIPVisionModelWithProjection.from_pretrained(folder)  # by path, safetensors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=None, help="default 512 (tiny) / 8192 (vitb16)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (tiny) / 256 (vitb16)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--source", choices=("tensors", "imagestore"), default="tensors")
    p.add_argument("--goal", type=float, default=0.9, help="build / bare_device images/s goal")
    p.add_argument("--out", default="benchmarks/bank_build.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images or (512 if args.preset == "tiny" else 8192)
    bs = args.batch_size or (64 if args.preset == "tiny" else 256)
    size = PRESETS[args.preset]["image_size"]
    with tempfile.TemporaryDirectory() as tmp:
        tower = load_tower(args.preset, tmp)
    model = TowerModel(tower, PRESETS[args.preset]["projection_dim"]).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = [f"img{i:06d}" for i in range(n)]
    tmp_images = None
    if args.source == "imagestore":
        from PIL import Image

        from cir_plugins.data.images import ImageStore

        tmp_images = tempfile.TemporaryDirectory()
        paths = {}
        for i in ids:  # 1.2x the tower's size, so the transform resizes and crops
            side = int(size * 1.2)
            pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(os.path.join(tmp_images.name, f"{i}.jpg"), quality=90)
            paths[i] = f"{i}.jpg"
        images = ImageStore(tmp_images.name, paths, "clip", size=size)
        host = {i: images[i] for i in ids}  # decoded once, for the bare rows
    else:
        images = {i: torch.randn(3, size, size, generator=g) for i in ids}  # host memory, like a dataset
        host = images
    use_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if use_cuda else torch.float32

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    on_device = torch.stack([host[i] for i in ids]).to(device)  # the ceiling's input, outside the timing

    def bare(from_host: bool):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            for s in range(0, n, bs):
                if from_host:
                    batch = torch.stack([host[i] for i in ids[s:s + bs]])
                    batch = batch.pin_memory().to(device, non_blocking=True) if use_cuda else batch
                else:
                    batch = on_device[s:s + bs]
                model.encode_image(batch)
        sync()

    def build():
        # encoding only: the pixel-identical grouping (on by default) is its own pass over the images
        NegativeBank.build(model, ids, images, batch_size=bs, device=device, dtype=dtype,
                           num_workers=args.num_workers, show_progress=False, dedup=False)
        sync()

    runs = {"bare_device": lambda: bare(False), "bare_host": lambda: bare(True), "build": build}
    # warm-up: allocator, cuDNN/cuBLAS heuristics, the build's parameter probe
    for fn in runs.values():
        fn()
    times = {k: [] for k in runs}
    for _ in range(args.rounds):  # interleaved rounds: shared-machine load hits every method alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = []
    best_bare = n / statistics.median(times["bare_device"])
    for name in runs:
        med = statistics.median(times[name])
        rows.append(dict(method=name, seconds=med, images_per_s=n / med, vs_bare_device=(n / med) / best_bare))
    dev_name = torch.cuda.get_device_name(device) if use_cuda else (platform.processor() or "cpu")
    ratio = next(r["vs_bare_device"] for r in rows if r["method"] == "build")
    print(f"device: {dev_name}; preset {args.preset}; {n} images {size}x{size} from {args.source}; batch {bs}; "
          f"workers {args.num_workers}; median of {args.rounds} rounds")
    print(f"{'method':12} {'seconds':>9} {'images/s':>10} {'vs bare_device':>15}")
    for r in rows:
        print(f"{r['method']:12} {r['seconds']:9.3f} {r['images_per_s']:10.1f} {r['vs_bare_device']:15.2f}")
    print(f"build / bare_device = {ratio:.2f} (goal >= {args.goal}: {'met' if ratio >= args.goal else 'not met'}); "
          f"spread of build over rounds: {min(times['build']):.3f}-{max(times['build']):.3f} s")
    out = dict(**record_header("bank_build"), device=dev_name,
               preset=args.preset, images=n, batch_size=bs, num_workers=args.num_workers,
               threads=torch.get_num_threads(), source=args.source, rows=rows, raw_seconds=times,
               build_vs_bare_device=ratio, goal=args.goal, meets_goal=ratio >= args.goal)
    write_json(args.out, out)
    print(f"wrote {args.out}")
    if tmp_images is not None:
        tmp_images.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
