"""CLIP4Cir's published stage-1 checkpoints -> a folder ``CLIP4Cir.from_pretrained`` reads, one command.

    python -m examples.clip4cir.convert --clip cirr_clip_RN50x4_fullft.pt --combiner cirr_comb_RN50x4_fullft.pt \
        --out runs/clip4cir_stage1

CLIP4Cir saves ``torch.save({"epoch": int, "CLIP": state_dict})`` for the fine-tuned CLIP (OpenAI's CLIP
RN50x4, OpenAI parameter names) and ``{"epoch": int, "Combiner": state_dict}`` for the Combiner. Both are
read weights-only (``cir_plugins.convert.read_torch_checkpoint``: nothing in them runs). The CLIP weights
keep their OpenAI names in ``open_clip.safetensors`` (the open_clip backbone reads them); the Combiner's
names ``text_projection_layer`` / ``image_projection_layer`` / ``dynamic_scalar`` become this example's
``text_projection`` / ``image_projection`` / ``gate`` (``combiner_layer`` and ``output_layer`` keep theirs)
in ``combiner.safetensors``; ``clip4cir.json`` records the fusion ("combiner" with a Combiner, else "sum",
the SPN release's choice for CLIP4Cir). Needs the ``open_clip`` extra (``pip install .[open_clip]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cir_plugins._atomic import atomic_write_json
from cir_plugins.convert import read_torch_checkpoint, save_safetensors
from cir_plugins.errors import CheckpointError, explain
from examples.clip4cir.model import OPEN_CLIP_WEIGHTS, CLIP4Cir

__all__ = ["COMBINER_NAMES", "combiner_to_example", "convert_checkpoints"]

# CLIP4Cir's Combiner module names -> this example's
COMBINER_NAMES = {"text_projection_layer": "text_projection", "image_projection_layer": "image_projection",
                  "dynamic_scalar": "gate", "combiner_layer": "combiner_layer", "output_layer": "output_layer"}


def combiner_to_example(state_dict: dict) -> dict:
    """Rename a CLIP4Cir Combiner state dict to :class:`examples.clip4cir.model.Combiner`'s names."""
    out, unknown = {}, []
    for name, tensor in state_dict.items():
        head, _, rest = name.partition(".")
        if head in COMBINER_NAMES and rest:
            out[f"{COMBINER_NAMES[head]}.{rest}"] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(
            explain(
                "these names are not CLIP4Cir Combiner parameters",
                got=unknown[:10],
                expected=sorted(COMBINER_NAMES),
                fix="pass the Combiner checkpoint as --combiner",
            )
        )
    return out


def convert_checkpoints(clip: str | Path, out: str | Path, *, combiner: str | Path | None = None,
                        fusion: str | None = None, clip_key: str | None = None) -> Path:
    """Convert the CLIP checkpoint (and optionally the Combiner's) into ``out``; checks that they load."""
    clip_state = read_torch_checkpoint(clip, key=clip_key)
    combiner_state = combiner_to_example(read_torch_checkpoint(combiner)) if combiner else None
    fusion = fusion or ("combiner" if combiner_state is not None else "sum")
    try:  # builds the architecture from the shapes and loads every tensor: a wrong file fails here, not later
        CLIP4Cir.from_openai_state_dict(clip_state, fusion=fusion, combiner_state=combiner_state)
    except (KeyError, RuntimeError, ValueError, AssertionError) as error:
        raise CheckpointError(
            explain(
                f"{clip}{' / ' + str(combiner) if combiner else ''} is not an OpenAI-format "
                f"CLIP (+ CLIP4Cir Combiner) checkpoint: {str(error).splitlines()[0]}",
                fix="pass CLIP4Cir's saved CLIP (--clip) and Combiner (--combiner) files",
            )
        ) from error
    out = Path(out)
    save_safetensors(clip_state, out / OPEN_CLIP_WEIGHTS, metadata={"source": str(clip), "names": "openai"})
    if combiner_state is not None:
        save_safetensors(combiner_state, out / "combiner.safetensors", metadata={"source": str(combiner)})
    atomic_write_json(out / "clip4cir.json", {"fusion": fusion, "backbone": "open_clip", "clip": str(clip),
                                              "combiner": str(combiner) if combiner else None}, indent=2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.clip4cir.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True, help="CLIP4Cir's fine-tuned CLIP checkpoint ({'CLIP': ...})")
    parser.add_argument("--combiner", default=None, help="CLIP4Cir's Combiner checkpoint ({'Combiner': ...})")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--fusion", choices=("combiner", "sum"), default=None,
                        help="default: combiner with --combiner, else sum (the SPN release's CLIP4Cir fusion)")
    args = parser.parse_args(argv)
    out = convert_checkpoints(args.clip, args.out, combiner=args.combiner, fusion=args.fusion)
    print(f"converted -> {out} (CLIP4Cir.from_pretrained({str(out)!r}) or --model {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
