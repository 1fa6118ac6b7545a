"""Cost of one stage-2 step (cached references, static bank) against one stage-1 step (in-batch,
both towers) of the same batch, on a small CLIP (ViT) model built from a config.

The model is CLIP4Cir's simple variant: query = normalize(image_features(ref) + text_features(text)),
target = image_features(target). Stage 2 trains the text tower against the bank and reads the
reference features from the trainer's cache, so it never runs the vision tower.

    python benchmarks/stage2_step.py --batch-size 32 --bank-size 512 --steps 5 --out benchmarks/stage2_step.json

Prints a table and writes JSON (machine, torch version, settings, per-step seconds, ratio).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_plugins.data.triplet import Triplet  # noqa: E402
from cir_plugins.negatives.bank import NegativeBank  # noqa: E402
from cir_plugins.training import Stage1Config, Stage1Trainer, Stage2Config, Stage2Trainer  # noqa: E402


class TinyClip4Cir(nn.Module):
    """A transformers CLIPModel (ViT vision tower) with sum fusion; words hashed to token ids."""

    def __init__(self, image_size: int = 224, patch: int = 32, layers: int = 4, width: int = 256) -> None:
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        config = CLIPConfig(
            text_config=dict(vocab_size=1000, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=32),
            vision_config=dict(image_size=image_size, patch_size=patch, hidden_size=width,
                               intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=4),
            projection_dim=width)
        self.clip = CLIPModel(config)
        self.vocab = 1000

    def _tokens(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[1] + [2 + zlib.crc32(w.encode()) % (self.vocab - 3) for w in t.split()][:30] + [self.vocab - 1]
                for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids.to(device), mask.to(device)

    def _features(self, output):
        return output if torch.is_tensor(output) else output.pooler_output

    def encode_image(self, images):
        return self._features(self.clip.get_image_features(pixel_values=images))  # (N, D)

    def encode_reference(self, images):
        return self._features(self.clip.get_image_features(pixel_values=images))  # (B, D)

    def compose_query(self, reference, texts):
        ids, mask = self._tokens(texts, reference.device)
        text = self._features(self.clip.get_text_features(input_ids=ids, attention_mask=mask))  # (B, D)
        return F.normalize(reference, dim=-1) + F.normalize(text, dim=-1)


def time_steps(trainer, steps: int, batch: list) -> list[float]:
    """Seconds of each full step (``trainer.train_step``: forward, backward, optimiser) on the same batch."""
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, optimiser state)
        start = time.perf_counter()
        trainer.train_step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bank-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/stage2_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = TinyClip4Cir().to(device)
    n = args.bank_size
    images = {f"im{i:05d}": torch.randn(3, 224, 224) for i in range(n)}
    ids = list(images)
    words = ["red", "blue", "with", "a", "dog", "cat", "bigger", "smaller", "on", "grass", "two", "more"]
    triplets = [Triplet(ids[i], (" ".join(words[(i + k) % 12] for k in range(6)),), ids[(i * 7 + 3) % n])
                for i in range(args.batch_size * 2)]
    common = dict(epochs=1, batch_size=args.batch_size, lr=2e-5, show_progress=False,
                  amp=args.amp)

    stage1 = Stage1Trainer(model, triplets, images, config=Stage1Config(**common))
    batch = triplets[:args.batch_size]  # one global batch of triplets (texts[0] each)
    t1 = time_steps(stage1, args.steps, batch)

    build_start = time.perf_counter()
    bank = NegativeBank.build(model, ids, images, batch_size=64, device=device, show_progress=False,
                              dedup=False)  # random images: nothing to group; times the encoding alone
    build_s = time.perf_counter() - build_start
    for p in model.parameters():
        p.requires_grad_(True)
    stage2 = Stage2Trainer(model, bank, triplets, images, config=Stage2Config(**common))
    vision_calls = []
    hook = model.clip.vision_model.register_forward_hook(lambda *a: vision_calls.append(1))
    t2 = time_steps(stage2, args.steps, batch)
    hook.remove()

    s1, s2 = statistics.median(t1), statistics.median(t2)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "model": "CLIPModel ViT 224px patch 32, 4 layers, width 256 (vision and text), sum fusion",
        "batch_size": args.batch_size, "bank_rows": len(bank), "amp": str(stage2.amp_dtype),
        "stage1_step_s": t1, "stage2_step_s": t2,
        "stage1_median_s": s1, "stage2_median_s": s2, "ratio_stage2_over_stage1": s2 / s1,
        "vision_tower_calls_in_stage2_steps": len(vision_calls), "bank_build_s": build_s,
    }
    print(f"{'step':<28}{'median s':>10}{'min s':>10}")
    print(f"{'stage 1 (in-batch, both)':<28}{s1:>10.4f}{min(t1):>10.4f}")
    print(f"{'stage 2 (bank, text only)':<28}{s2:>10.4f}{min(t2):>10.4f}")
    print(f"ratio stage2/stage1 = {s2 / s1:.3f} (goal <= 0.2); vision tower calls in stage 2: {len(vision_calls)}")
    print(f"bank of {len(bank)} rows built in {build_s:.1f}s on {result['device']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
