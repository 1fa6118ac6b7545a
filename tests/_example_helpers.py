"""Helpers shared by the example tests (tests/test_example_*.py): random image mappings and the README's
bash block run as written. The one-intra-op-thread fixture lives in conftest.py (``one_torch_thread``)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def random_images(n: int, seed: int = 1, size: int = 32) -> dict[str, torch.Tensor]:
    """``n`` images ``img0..img{n-1}``, each a standard-normal (3, size, size) tensor from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {f"img{k}": torch.randn(3, size, size, generator=g) for k in range(n)}


def check_integration_files(example_dir: Path) -> None:
    """wrap.py (the whole integration) is at most 10 lines and quoted verbatim in the README; model.py does
    not import cir_plugins (the model stays the project's own code)."""
    code = (example_dir / "wrap.py").read_text()
    assert len(code.strip().splitlines()) <= 10
    assert code.strip() in (example_dir / "README.md").read_text()
    assert "import cir_plugins" not in (example_dir / "model.py").read_text()


def readme_commands(example_dir: Path) -> list[str]:
    """The commands of the first ```bash block of ``example_dir/README.md`` (continuations joined, comments out)."""
    readme = (example_dir / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()
            and not line.lstrip().startswith("#")]


def run_readme_commands(example_dir: Path, cwd: Path) -> None:
    """Run the README's tiny-checkpoint and cycle commands in ``cwd``; each must exit 0 and leave results.json."""
    commands = readme_commands(example_dir)
    assert any("tiny-checkpoint" in c for c in commands) and any(" cycle " in c for c in commands)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert list(cwd.glob("runs/*/results.json"))
