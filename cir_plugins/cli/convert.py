"""``cir-plugins convert``: a ``torch.save`` checkpoint -> one safetensors file, read weights-only (nothing in it
runs: :func:`cir_plugins.convert.read_torch_checkpoint`); the tensors keep their names.

    cir-plugins convert tuned_clip_best.pt clip.safetensors --key CLIP
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..convert import read_torch_checkpoint, save_safetensors
from ..errors import ConfigError, explain


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="the .pt/.pth file written by torch.save")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--key", default=None, help="the entry that holds the state dict (e.g. CLIP, Combiner, model); "
                                                    "default: the file is a state dict or holds exactly one")


def run(args: argparse.Namespace) -> int:
    source, target = Path(args.input), Path(args.output)
    if target.exists() and source.exists() and os.path.samefile(source, target):
        raise ConfigError(explain("the output would overwrite the input checkpoint",
                                  got=f"{args.input} -> {args.output}",
                                  fix="name another output file, e.g. " + str(source.with_suffix(".safetensors"))))
    tensors = read_torch_checkpoint(args.input, key=args.key)
    path = save_safetensors(tensors, args.output, metadata={"source": str(args.input), "key": str(args.key or "")})
    print(f"wrote {len(tensors)} tensors to {path}")
    return 0
