"""``cir-plugins world``: write (or refresh) the embedded synthetic CIR world under ``--root``.

    cir-plugins world --root runs/world [--seed 0] [--quick] [--image-size 40] [--config JSON]

Prints a short summary; the full statistics are in ``{root}/synthetic/world.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .._console import format_values
from ._common import add_progress_argument, parse_json_object, show_progress

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="directory to write the world into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the small preset (seconds)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--config", default=None,
                        help='JSON object of WorldConfig fields overriding the preset, e.g. \'{"pixel_noise": 16}\'')
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if up to date")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic import PRESETS, make_world, world_record

    size: Any = "quick" if args.quick else "default"
    if args.config:
        overrides = parse_json_object(args.config, "--config",
                                      fix='pass a JSON object such as \'{"n_val_queries": 200}\'')
        size = {**PRESETS[size], **overrides}
    root = make_world(args.root, seed=args.seed, size=size, image_size=args.image_size, overwrite=args.overwrite,
                      show_progress=show_progress(args))
    record = world_record(root)
    print(summary(record["stats"], root, record["path"]))
    return 0


def summary(stats: dict[str, Any], root: Path, marker: Path) -> str:
    """A few lines about the world: images and queries per split, duplicates, edit kinds, objects per image."""
    lines = [f"synthetic world at {root}:"]
    for split, count in stats.get("images", {}).items():
        lines.append(f"  {split}: {count} images, {stats.get('queries', {}).get(split, 0)} queries")
    if "duplicates" in stats:
        lines.append(f"  {len(stats['duplicates'])} images are exact copies of others (duplicates)")
    for key in ("edit_counts", "objects_per_image"):
        if stats.get(key):
            lines.append(f"  {key.replace('_', ' ')}: {format_values(stats[key])}")
    lines.append(f"full statistics: {marker}")
    return "\n".join(lines)
