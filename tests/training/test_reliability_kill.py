"""kill -9 during checkpoint writing, with a process id that repeats (issue 18, must show): whatever the moment
of the kill inside a save, the resumed run starts from the newest complete checkpoint and ends bit-identical to
an uninterrupted run; leftovers named after the same (faked) pid never break a save and are cleaned up.

Every kill point is enumerated: each call the save makes to write, fsync, rename or remove is one point, and the
kill lands either just before it or half-way through it (half a file written, half a leftover deleted). The
in-process sweep stops the save with an exception no code catches (nothing of the save runs after it, as with
SIGKILL); the subprocess test sends a real SIGKILL to a child process at a few of the same points.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _toy import make_model, make_world
from safetensors.torch import load_file

import cir_plugins._atomic as atomic
import cir_plugins.training.checkpoint as ckpt
import cir_plugins.training.resume as resume
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training import Stage2Config, Stage2Trainer

FAKE_PID = 4242
STEPS_PER_EPOCH = 5  # 40 triplets, batch 8


class Killed(BaseException):
    """Stands for SIGKILL in-process: a BaseException no library code catches."""


def _world():
    images, train, _ = make_world(n_images=23, n_train=40, n_val=4)
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, show_progress=False)
    return model, bank, images, train


def _config(out, epochs):
    return Stage2Config(epochs=epochs, batch_size=8, lr=1e-2, show_progress=False,
                        output_dir=str(out))


class KillSwitch:
    """Counts the save's file operations (the kill points) and kills at point ``at`` (1-based), either
    ``before`` the operation or ``half`` way through it. ``at=None`` only counts (and records the names)."""

    def __init__(self, at: int | None, mode: str, on_kill=None) -> None:
        self.at, self.mode, self.count, self.names = at, mode, 0, []
        self.armed = False
        self.on_kill = on_kill or self._raise

    @staticmethod
    def _raise():
        raise Killed()

    def point(self, name: str, half=None) -> None:
        if not self.armed:
            return
        self.count += 1
        self.names.append(re.sub(r"-[0-9a-f]{8,}-[0-9a-f]{8}\b", "-*", name))  # the save's unique suffix
        if self.count == self.at:
            if self.mode == "half" and half is not None:
                half()
            self.on_kill()

    def install(self, monkeypatch) -> None:
        real_save_file, real_fsync_file, real_fsync_dir = ckpt.save_file, ckpt.fsync_file, atomic.fsync_dir
        real_replace, real_rmtree, real_checksum = os.replace, shutil.rmtree, ckpt._document_checksum

        def save_file(tensors, path, metadata=None):
            def half():
                real_save_file(tensors, path, metadata=metadata)
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[: len(data) // 2])
            self.point(f"save_file {Path(path).name}", half)
            return real_save_file(tensors, path, metadata=metadata)

        def fsync_dir(path):
            folder = Path(path)
            # the state.json written just before fsync_dir(tmp) is torn half way (a power cut, not a kill)
            half = ((lambda: (folder / "state.json").write_bytes((folder / "state.json").read_bytes()[:100]))
                    if (folder / "state.json").is_file() and folder.name.startswith(".tmp-") else None)
            self.point(f"fsync_dir {folder.name}", half)
            return real_fsync_dir(path)

        def fsync_file(path):
            self.point(f"fsync_file {Path(path).name}")
            return real_fsync_file(path)

        def checksum(document):  # the moment just before state.json is written
            self.point("write state.json")
            return real_checksum(document)

        def replace(src, dst):
            self.point(f"replace {Path(src).name} -> {Path(dst).name}")
            return real_replace(src, dst)

        def rmtree(path, *args, **kwargs):
            def half():
                for child in sorted(Path(path).iterdir())[:2]:
                    child.unlink()
            self.point(f"rmtree {Path(path).name}", half)
            return real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(ckpt, "save_file", save_file)
        monkeypatch.setattr(ckpt, "fsync_file", fsync_file)
        for module in (ckpt, atomic):  # the folder swap may live in either (the package's atomic helpers)
            if hasattr(module, "fsync_dir"):
                monkeypatch.setattr(module, "fsync_dir", fsync_dir)
        monkeypatch.setattr(ckpt, "_document_checksum", checksum)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)


def _leftovers_from_an_earlier_container(checkpoints: Path) -> None:
    """What a killed earlier run with the same pid left: a complete stale copy (epoch 1) and a torn temp."""
    shutil.copytree(checkpoints / "last", checkpoints / f".old-last-{FAKE_PID}")
    torn = checkpoints / f".tmp-last-{FAKE_PID}"
    torn.mkdir()
    data = (checkpoints / "last" / "weights.safetensors").read_bytes()
    (torn / "weights.safetensors").write_bytes(data[: len(data) // 3])


def _expected_step(names: list[str], killed_at: int, mode: str) -> int:
    """The oracle: the epoch-2 save (step 10) is complete once its state.json has been written whole, i.e.
    the kill came after the 'write state.json' point and did not tear that file; else epoch 1 (step 5)."""
    # the last point that writes state.json: the write itself, or the rename of its temp file into place
    written = max(
        i for i, n in enumerate(names, 1) if n == "write state.json" or n.startswith("replace state.json.tmp-")
    )
    torn_state = mode == "half" and names[killed_at - 1].startswith("fsync_dir .tmp-")
    return 2 * STEPS_PER_EPOCH if killed_at > written and not torn_state else STEPS_PER_EPOCH


def _resume_and_check(out: Path, straight: dict, expected_step: int, monkeypatch) -> None:
    seen = []
    real_load = resume.load_checkpoint

    def spy(*args, **kwargs):
        found = real_load(*args, **kwargs)
        seen.append(found.state["global_step"])
        return found

    monkeypatch.setattr(resume, "load_checkpoint", spy)
    model, bank, images, train = _world()
    Stage2Trainer(model, bank, train, images, config=_config(out, epochs=3)).fit(resume=True)
    assert seen == [expected_step]
    got = load_file(str(out / "checkpoints" / "last" / "weights.safetensors"))
    assert got.keys() == straight.keys()
    for name in got:
        assert torch.equal(got[name], straight[name]), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last"]  # leftovers cleaned up


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    model, bank, images, train = _world()
    Stage2Trainer(model, bank, train, images, config=_config(out, epochs=3)).fit()
    return load_file(str(out / "checkpoints" / "last" / "weights.safetensors"))


@pytest.fixture(scope="module")
def epoch1(tmp_path_factory):
    out = tmp_path_factory.mktemp("epoch1")
    model, bank, images, train = _world()
    Stage2Trainer(model, bank, train, images, config=_config(out, epochs=1)).fit()
    _leftovers_from_an_earlier_container(out / "checkpoints")
    return out


def _resume_to_epoch_2(out: Path, switch: KillSwitch, patch) -> None:
    """With the faked pid and the switch installed (armed once the epoch-2 save starts), resume ``out`` to
    epoch 2; the switch kills the run at its point, if it has one."""
    patch.setattr(os, "getpid", lambda: FAKE_PID)
    switch.install(patch)
    model, bank, images, train = _world()
    trainer = Stage2Trainer(model, bank, train, images, config=_config(out, epochs=2))
    real_save = trainer._save
    trainer._save = lambda name: (setattr(switch, "armed", True), real_save(name))
    trainer.fit(resume=True)


def _points(tmp_path, epoch1, monkeypatch) -> list[str]:
    """The kill points of the epoch-2 save (a dry run that only counts)."""
    out = tmp_path / "count"
    shutil.copytree(epoch1, out)
    switch = KillSwitch(None, "before")
    with monkeypatch.context() as patch:
        _resume_to_epoch_2(out, switch, patch)
    return switch.names


def test_kill_at_every_point_of_a_save_with_a_repeated_pid_resumes_from_the_newest_complete(
        tmp_path, epoch1, straight, monkeypatch):
    names = _points(tmp_path, epoch1, monkeypatch)
    assert "write state.json" in names and any(n.startswith("rmtree .old-last-") for n in names)
    assert len(names) >= 10
    outcomes = {}
    for mode in ("before", "half"):
        for at in range(1, len(names) + 1):
            out = tmp_path / f"{mode}-{at}"
            shutil.copytree(epoch1, out)
            switch = KillSwitch(at, mode)
            with monkeypatch.context() as patch, pytest.raises(Killed):
                _resume_to_epoch_2(out, switch, patch)
            assert switch.names == names[:at]  # the same save, killed at point `at`
            expected = _expected_step(names, at, mode)
            with monkeypatch.context() as patch:
                patch.setattr(os, "getpid", lambda: FAKE_PID)
                _resume_and_check(out, straight, expected, patch)
            outcomes[(mode, at)] = expected
    # both outcomes occur: before the new state.json is whole the old copy is used, after it the new one
    assert set(outcomes.values()) == {STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH}


CHILD = """
import os, signal, sys
sys.path[:0] = [{tests!r}, {tests_root!r}]
import test_reliability_kill as t
t._child({out!r}, {at}, {mode!r})
"""


def _child(out: str, at: int, mode: str) -> None:
    """Run in a subprocess: resume to epoch 2 with the faked pid and SIGKILL ourselves at kill point ``at``."""
    real_pid = os.getpid()
    switch = KillSwitch(at, mode, on_kill=lambda: os.kill(real_pid, signal.SIGKILL))
    _resume_to_epoch_2(Path(out), switch, pytest.MonkeyPatch())
    raise SystemExit("not killed")


@pytest.mark.slow
@pytest.mark.parametrize("label", ["half of weights", "between the renames", "half of a leftover removed",
                                   "torn state.json"])
def test_sigkill_in_a_subprocess_during_a_save_resumes_from_the_newest_complete(
        tmp_path, epoch1, straight, monkeypatch, label):
    names = _points(tmp_path, epoch1, monkeypatch)
    pick = {"half of weights": ("half", names.index("save_file weights.safetensors") + 1),
            "between the renames": ("before", next(i for i, n in enumerate(names, 1)
                                                   if n.startswith("replace .tmp-last-"))),
            "half of a leftover removed": ("half", next(i for i, n in enumerate(names, 1)
                                                        if n.startswith("rmtree .old-last-"))),
            "torn state.json": ("half", next(i for i, n in enumerate(names, 1) if n.startswith("fsync_dir .tmp-")))}
    mode, at = pick[label]
    out = tmp_path / "run"
    shutil.copytree(epoch1, out)
    script = CHILD.format(tests=str(Path(__file__).parent), tests_root=str(Path(__file__).parents[1]), out=str(out),
                         at=at, mode=mode)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    monkeypatch.setattr(os, "getpid", lambda: FAKE_PID)
    _resume_and_check(out, straight, _expected_step(names, at, mode), monkeypatch)
    assert json.loads((out / "checkpoints" / "last" / "state.json").read_text())["epoch"] == 3
