"""The stage-2 step at real size (issue 20): where the time of one training step goes, beside stage 1.

Two models from the examples, random weights from configs (nothing is downloaded):

  clip4cir  examples/clip4cir: CLIP4Cir with the Combiner on a ViT-L/14-sized transformers CLIPModel
            (vision 24 x 1024, patch 14, 224 px; text 12 x 768; projection 768), batch 256, bank
            (N, 768) bf16, dot similarity. Stage 2 trains the text tower + Combiner from cached
            reference features.
  sprc      examples/blip2_sprc: SPRCRetriever on a BLIP-2-sized Blip2ForImageTextRetrieval (ViT-g
            39 x 1408, Q-Former 12 x 768, 32 query tokens, 256-d), batch 32, bank (N, 32, 256) bf16,
            max-over-tokens similarity. Stage 2 trains the Q-Former copy (+ its embeddings and the
            text projection) from cached fusion prompts.

The bank is N random unit rows (default 1M) in bf16; each query excludes one row (its reference).
Per model and bank-loss precision ("exact" = the float32-grade single-pass kernel, "two_pass" =
issue 20's design), one stage-2 step is timed split into

  text side   the text encoder forward + backward (SPRC: the Q-Former copy's pass, which is also its fusion)
  fusion      the Combiner forward + backward (SPRC: none, inside the text side)
  bank loss   cir_plugins' bank_contrastive_loss forward + backward to the query
  optimiser   AdamW step + zero_grad

(the pieces are cut with detach()/backward(grad) at the text features and the query; CUDA events
around each), and the same step without the cuts (``stage2_step_ms``). Beside it: the stage-1 step of
the same model and batch (both towers with gradient, in-batch loss of cir_plugins' InBatchNegatives;
SPRC keeps its vision tower frozen as BLIP-2 does). Peak memory per step from
torch.cuda.max_memory_allocated. Prints a table, writes JSON.

    python benchmarks/stage2_real.py --out benchmarks/stage2_real_gpu.json              # an H100/H200
    python benchmarks/stage2_real.py --tiny --device cpu --out /tmp/stage2_real_tiny.json  # CPU smoke

``--tiny`` swaps in small configs, B = 4, N = 2048 and one timed step: it proves the script runs; its
timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from _common import record_header, write_json  # noqa: E402

from cir_plugins.negatives.loss import bank_contrastive_loss  # noqa: E402
from cir_plugins.training.stage1 import InBatchNegatives  # noqa: E402

WORDS = "red blue green dress shirt with a longer sleeve and darker pattern less more shiny dog cat on grass".split()
TAU = 0.05


class Timer:
    """Named regions timed with CUDA events (GPU time between them) or perf_counter on the CPU; summed per name."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.events = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            stop.record()
            self.events[name].append((start, stop))
        else:
            t0 = time.perf_counter()
            yield
            self.events[name].append(time.perf_counter() - t0)

    def ms(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) for k, v in self.events.items()}
        return {k: 1e3 * sum(v) for k, v in self.events.items()}


def word_tokenizer():
    """The examples' word-level tokenizer over this script's words (<bos> words <eos>, 32 tokens at most): its
    ids fit any vocabulary size, so it feeds both models' text sides."""
    from _tiny_clip import build_tokenizer, words_of

    return build_tokenizer(words_of(WORDS), max_length=32)


def build_clip4cir(tiny: bool, tokenizer, device):
    from clip4cir.model import CLIP4Cir
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=max(1000, len(tokenizer)), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16)
    projection = 768
    if tiny:
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        vision.update(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2)
        projection = 64
    with torch.device(device):
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
        model = CLIP4Cir(clip, tokenizer, fusion="combiner")
    return model, vision["image_size"], projection


def build_sprc(tiny: bool, tokenizer, device):
    from blip2_sprc.model import SPRCRetriever
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14)
    qformer = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   vocab_size=max(30523, len(tokenizer)), max_position_embeddings=512, encoder_hidden_size=1408,
                   cross_attention_frequency=2, use_qformer_text_input=True, pad_token_id=0)
    if tiny:
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                      patch_size=8)
        qformer.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=len(tokenizer), max_position_embeddings=64, encoder_hidden_size=32,
                       cross_attention_frequency=1)
    config = Blip2Config(vision_config=vision, qformer_config=qformer,
                         text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          ffn_dim=32, word_embed_proj_dim=16, vocab_size=64),
                         num_query_tokens=32, image_text_hidden_size=256)
    with torch.device(device):
        blip = Blip2ForImageTextRetrieval(config)
        model = SPRCRetriever(blip, tokenizer)
    return model, vision["image_size"], 256


def random_bank(n: int, shape: tuple, device, seed: int = 0) -> torch.Tensor:
    """(n, *shape) unit rows (unit tokens) in bf16, generated in slices."""
    g = torch.Generator(device=device).manual_seed(seed)
    bank = torch.empty((n, *shape), dtype=torch.bfloat16, device=device)
    step = max(1, (1 << 26) // max(1, int(torch.tensor(shape).prod())))
    for s in range(0, n, step):
        e = min(n, s + step)
        bank[s:e] = F.normalize(torch.randn((e - s, *shape), device=device, generator=g), dim=-1).to(torch.bfloat16)
    return bank


class Case:
    """One model's stage-2 and stage-1 steps on one fixed batch."""

    def __init__(self, name, model, image_size, dim, batch, bank_rows, device, amp):
        self.name, self.model, self.device, self.amp = name, model, device, amp
        self.sprc = name == "sprc"
        self.similarity = "max_token" if self.sprc else "dot"
        g = torch.Generator(device=device).manual_seed(1)
        self.texts = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(12 + i % 8)) for i in range(batch)]
        self.ref_images = torch.randn(batch, 3, image_size, image_size, device=device, generator=g)
        self.tgt_images = torch.randn(batch, 3, image_size, image_size, device=device, generator=g)
        if self.sprc:  # the cached fusion prompt (reference side reads the text), (B, 32, H)
            hidden = model.blip.query_tokens.shape[-1]
            self.cached = torch.randn(batch, 32, hidden, device=device, generator=g)
        else:  # the cached raw reference features (B, D)
            self.cached = torch.randn(batch, dim, device=device, generator=g)
        self.rows = torch.randint(0, bank_rows, (batch,), device=device, generator=g)
        self.exclude = ((self.rows + 1) % bank_rows)[:, None]  # the reference's own row

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    # ---------------------------------------------------------------- stage 2
    def stage2_parameters(self):
        m = self.model
        if self.sprc:
            modules = [m.query_qformer, m.query_embeddings, m.blip.text_projection]
            return [p for mod in modules for p in mod.parameters()]
        names = set(m.text_tower_parameters())
        return [p for n, p in m.named_parameters() if n in names] + list(m.combiner.parameters())

    def text_side(self):
        if self.sprc:
            return self.model.compose(self.cached, self.texts)  # (B, 256): text + fusion in one pass
        return self.model.text_features(self.texts)  # (B, D)

    def fusion(self, text):
        if self.sprc:
            return text
        return self.model.combiner(self.cached.to(text.dtype), text)

    def bank_loss(self, query, bank, precision):
        return bank_contrastive_loss(query.float(), bank, self.rows, TAU, exclude_rows=self.exclude,
                                     similarity=self.similarity, precision=precision)

    def stage2_split(self, bank, precision, opt, timer):
        with timer("text side"), self.autocast():
            text = self.text_side()
        text_in = text.detach().requires_grad_(True)
        with timer("fusion"), self.autocast():
            query = self.fusion(text_in)
        query_in = query.detach().float().requires_grad_(True)
        with timer("bank loss"):
            loss = self.bank_loss(query_in, bank, precision)
            loss.backward()
        with timer("fusion"):
            if query.requires_grad:
                query.backward(query_in.grad.to(query.dtype))
        with timer("text side"):
            text.backward(text_in.grad if text_in.grad is not None else query_in.grad.to(text.dtype))
        with timer("optimiser"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def stage2_plain(self, bank, precision, opt, timer):
        with timer("step"):
            with self.autocast():
                query = self.fusion(self.text_side())
            loss = self.bank_loss(query, bank, precision)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------- stage 1
    def stage1_parameters(self):
        if self.sprc:  # BLIP-2 keeps the vision tower frozen
            vision = {id(p) for p in self.model.blip.vision_model.parameters()}
            return [p for p in self.model.parameters() if id(p) not in vision]
        return list(self.model.parameters())

    def stage1_step(self, opt, timer):
        in_batch = InBatchNegatives(similarity=self.similarity)
        with timer("step"):
            with self.autocast():
                if self.sprc:
                    query = self.model(self.ref_images, self.texts)  # (B, 256)
                    targets = self.model.image_tokens(self.tgt_images)  # (B, 32, 256)
                else:
                    query = self.model(self.ref_images, self.texts)  # (B, D)
                    targets = self.model.encode_image(self.tgt_images)  # (B, D)
            rows = torch.arange(query.shape[0], device=self.device)
            loss = in_batch.loss(query.float(), F.normalize(targets.float(), dim=-1), rows, None,
                                 torch.tensor(TAU, device=self.device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def run_steps(fn, steps: int, cuda: bool, warmup: int = 1):
    """``warmup`` untimed calls, then ``steps`` timed ones; returns (per-name median ms, peak GB over the timed
    calls)."""
    for _ in range(warmup):
        fn(Timer(cuda))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    per_step = []
    for _ in range(steps):
        timer = Timer(cuda)
        fn(timer)
        per_step.append(timer.ms())
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    names = per_step[0].keys()
    return {k: statistics.median(s[k] for s in per_step) for k in names}, peak


def set_trainable(model, params):
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def measure(case: Case, bank, precisions, steps, cuda, warmup=1) -> dict:
    out = {"model": case.name, "batch": len(case.texts), "bank_shape": list(bank.shape), "similarity": case.similarity}
    params = case.stage2_parameters()
    set_trainable(case.model, params)
    out["stage2_trained_params_M"] = sum(p.numel() for p in params) / 1e6
    for precision in precisions:
        opt = torch.optim.AdamW(params, lr=1e-6)
        losses = []
        split, peak_split = run_steps(lambda t: losses.append(case.stage2_split(bank, precision, opt, t)), steps, cuda,
                                      warmup)
        plain, peak_plain = run_steps(lambda t: case.stage2_plain(bank, precision, opt, t), steps, cuda, warmup)
        total = sum(split.values())
        out[f"stage2_{precision}"] = {
            "split_ms": split, "split_total_ms": total, "stage2_step_ms": plain["step"],
            "bank_loss_share": split["bank loss"] / total, "peak_GB": peak_plain, "peak_GB_split": peak_split,
            "bank_loss_value": losses[-1]}
    params1 = case.stage1_parameters()
    set_trainable(case.model, params1)
    out["stage1_trained_params_M"] = sum(p.numel() for p in params1) / 1e6
    opt = torch.optim.AdamW(params1, lr=1e-6)
    try:
        s1, peak1 = run_steps(lambda t: case.stage1_step(opt, t), steps, cuda, warmup)
        out["stage1"] = {"step_ms": s1["step"], "peak_GB": peak1, "gradient_checkpointing": False}
    except torch.OutOfMemoryError as exc:
        # both towers with gradient at B=256 can exceed one GPU: measure it again with activation checkpointing
        note = f"plain step out of memory ({str(exc).splitlines()[0][:120]})"
        del exc
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
        tower = case.model.blip if case.sprc else case.model.clip
        # transformers 5 renames it; older releases only have gradient_checkpointing_enable
        (getattr(tower, "activation_checkpointing_enable", None) or tower.gradient_checkpointing_enable)()
        try:
            s1, peak1 = run_steps(lambda t: case.stage1_step(opt, t), steps, cuda, warmup)
            out["stage1"] = {"step_ms": s1["step"], "peak_GB": peak1, "gradient_checkpointing": True, "note": note}
        except torch.OutOfMemoryError:
            out["stage1"] = {"note": note + "; out of memory with gradient checkpointing too"}
    return out


def print_table(results: list, precisions) -> None:
    print(f"{'model':9} {'B':>4} {'step':14} {'text':>8} {'fusion':>8} {'bank loss':>10} {'optim':>8} "
          f"{'total ms':>9} {'loss %':>7} {'peak GB':>8}")
    for r in results:
        for precision in precisions:
            s = r[f"stage2_{precision}"]
            sp = s["split_ms"]
            peak = f"{s['peak_GB']:8.2f}" if s["peak_GB"] is not None else f"{'-':>8}"
            print(f"{r['model']:9} {r['batch']:>4} {'stage 2 ' + precision:14} {sp['text side']:8.1f} "
                  f"{sp['fusion']:8.1f} {sp['bank loss']:10.1f} {sp['optimiser']:8.1f} {s['stage2_step_ms']:9.1f} "
                  f"{100 * s['bank_loss_share']:6.1f}% {peak}")
        s1 = r["stage1"]
        if "step_ms" in s1:
            peak = f"{s1['peak_GB']:8.2f}" if s1["peak_GB"] is not None else f"{'-':>8}"
            label = "stage 1 (ckpt)" if s1.get("gradient_checkpointing") else "stage 1"
            print(f"{r['model']:9} {r['batch']:>4} {label:14} {'':>8} {'':>8} {'':>10} {'':>8} "
                  f"{s1['step_ms']:9.1f} {'':>7} {peak}")
        else:
            print(f"{r['model']:9} {r['batch']:>4} {'stage 1':14} {s1['note']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="clip4cir,sprc")
    p.add_argument("--precisions", default="exact,two_pass", help="bank-loss precisions to time")
    p.add_argument("--bank-rows", type=int, default=1_000_000)
    p.add_argument("--clip-batch", type=int, default=256)
    p.add_argument("--sprc-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up)")
    p.add_argument("--amp", default="bf16", choices=("bf16", "off"))
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each row")
    p.add_argument("--tiny", action="store_true", help="small configs, B=4, N=2048, one step, no warm-up (CPU smoke)")
    p.add_argument("--out", default="benchmarks/stage2_real_gpu.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.bank_rows, args.clip_batch, args.sprc_batch, args.steps, args.warmup = 2048, 4, 4, 1, 0
        torch.set_num_threads(1)  # tiny ops: threads only contend
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if args.amp == "bf16" else None
    precisions = args.precisions.split(",")
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    results = []
    for name in args.models.split(","):
        build = {"clip4cir": build_clip4cir, "sprc": build_sprc}[name]
        t0 = time.perf_counter()
        model, image_size, dim = build(args.tiny, tokenizer, device)
        model.train()
        shape = (32, dim) if name == "sprc" else (dim,)
        bank = random_bank(args.bank_rows, shape, device)
        batch = args.sprc_batch if name == "sprc" else args.clip_batch
        case = Case(name, model, image_size, dim, batch, args.bank_rows, device, amp)
        setup_s = time.perf_counter() - t0
        r = measure(case, bank, precisions, args.steps, cuda, args.warmup)
        r.update(params_M=sum(q.numel() for q in model.parameters()) / 1e6, setup_s=setup_s, image_size=image_size)
        results.append(r)
        del model, bank, case
        if cuda:
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device: {device_name}; bank N={args.bank_rows} bf16; amp={args.amp}; median of {args.steps} steps"
          + ("  (TINY smoke: timings mean nothing)" if args.tiny else ""))
    print_table(results, precisions)
    write_json(args.out, dict(**record_header("stage2_real"), device=device_name, torch=torch.__version__,
                              tiny=args.tiny, amp=args.amp, bank_rows=args.bank_rows, tau=TAU, results=results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
