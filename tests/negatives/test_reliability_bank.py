"""Reliability of bank building: SIGKILL and resume, torn or foreign shards, non-finite rows, mismatches.

The SIGKILL test runs the build in a subprocess, kills it (SIGKILL: no cleanup, no finally) once
finished shards are on disk, re-runs the same command and requires the bank to equal an
uninterrupted build bit for bit, with the finished shards not encoded again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _toy import make_model, make_world
from safetensors.torch import load_file

from cir_plugins.errors import BankMismatchError, DataError, NonFiniteError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.training.config import Stage2Config
from cir_plugins.training.stage2 import Stage2Trainer

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[1]
SHARD_GLOB = "rows-*.safetensors"

# The build script: 31 images in chunks of 3 (11 shards). Each encoder call sleeps so that the
# parent can kill it part-way; it logs the number of images it encodes per call to count re-work.
BUILD_SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path[:0] = [{tests!r}, {tests_root!r}]
    import torch
    torch.set_num_threads(1)
    from cir_plugins.negatives.bank import NegativeBank
    from _toy import make_model, make_world

    out, cache, calls_log, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    images, _, _ = make_world(n_images=31, n_train=4, n_val=2)
    model = make_model()
    original = model.encode_image

    def slow(x):
        with open(calls_log, "a") as handle:
            handle.write(f"{{x.shape[0]}}\\n")
        time.sleep(delay)
        return original(x)

    model.encode_image = slow
    bank = NegativeBank.build(model, list(images), images, batch_size=3, show_progress=False, cache_dir=cache)
    bank.save(out)
""")


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "build_bank.py"
    script.write_text(BUILD_SCRIPT.format(tests=str(TESTS), tests_root=str(TESTS.parent)))
    return script


def _encoded(calls_log: Path) -> int:
    """Images encoded by the bank loop (the first logged call of each run is the 1-image probe)."""
    return sum(int(line) for line in calls_log.read_text().split())


@pytest.mark.slow  # three subprocesses that each import torch: ~30 s on the shared 2-core box
def test_sigkill_during_bank_build_then_rerun_equals_uninterrupted(tmp_path):
    script = _script(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # uninterrupted reference run (no delay)
    straight_log = tmp_path / "straight.log"
    subprocess.run([sys.executable, str(script), str(tmp_path / "straight.safetensors"), str(tmp_path / "cache0"),
                    str(straight_log), "0"], check=True, env=env, timeout=120)

    cache = tmp_path / "cache"
    killed_log = tmp_path / "killed.log"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "bank.safetensors"), str(cache),
                             str(killed_log), "0.4"], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if cache.is_dir() and len(list(cache.glob(SHARD_GLOB))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the build finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    finished = len(list(cache.glob(SHARD_GLOB)))
    assert 3 <= finished < 11, "the run should have been killed part-way"
    assert not (tmp_path / "bank.safetensors").exists()

    resume_log = tmp_path / "resume.log"
    subprocess.run([sys.executable, str(script), str(tmp_path / "bank.safetensors"), str(cache), str(resume_log), "0"],
                   check=True, env=env, timeout=120)
    # nothing lost: the finished shards were not encoded again (1 probe image + the rest)
    assert _encoded(resume_log) - 1 <= 31 - 3 * finished
    straight = load_file(str(tmp_path / "straight.safetensors"))["embeddings"]
    resumed_bank = NegativeBank.load(tmp_path / "bank.safetensors")
    straight_bank = NegativeBank.load(tmp_path / "straight.safetensors")
    # nothing corrupted: bit-identical to the uninterrupted build, same ids, rows and fingerprint
    assert torch.equal(resumed_bank.embeddings, straight)
    assert resumed_bank.ids == straight_bank.ids
    assert resumed_bank.metadata() == straight_bank.metadata()


def test_torn_temp_and_corrupt_shards_are_never_read_as_whole(tmp_path, caplog):
    images, _, _ = make_world(n_images=13, n_train=4, n_val=2)
    model = make_model()
    ids = list(images)
    cache = tmp_path / "cache"
    full = NegativeBank.build(model, ids, images, batch_size=4, show_progress=False, cache_dir=cache)
    shards = sorted(cache.glob(SHARD_GLOB))
    assert len(shards) == 4
    data = shards[0].read_bytes()
    # a kill during the atomic write leaves only a temp file; a foreign tool may leave a cut file
    (cache / f"{shards[1].name}.tmp-12345").write_bytes(data[: len(data) // 2])
    shards[0].write_bytes(data[: len(data) // 2])  # a torn file under a final name: must be ignored
    calls = []
    original = model.encode_image
    model.encode_image = lambda x: calls.append(x.shape[0]) or original(x)
    with caplog.at_level("WARNING"):
        again = NegativeBank.build(model, ids, images, batch_size=4, show_progress=False, cache_dir=cache)
    assert torch.equal(again.embeddings, full.embeddings)
    assert sum(calls) == 1 + 4  # probe + the torn shard's 4 rows re-encoded, nothing else
    assert any("unreadable bank shard" in r.getMessage() for r in caplog.records)


def test_non_finite_embeddings_stop_the_build_naming_the_ids():
    images, _, _ = make_world(n_images=10, n_train=4, n_val=2)
    model = make_model()
    ids = list(images)
    images = dict(images)
    images[ids[6]] = torch.full_like(images[ids[6]], float("nan"))
    images[ids[7]] = torch.full_like(images[ids[7]], float("inf"))
    with pytest.raises(NonFiniteError) as caught:
        NegativeBank.build(model, ids, images, batch_size=4, show_progress=False)
    message = str(caught.value)
    assert ids[6] in message and ids[7] in message
    assert ids[4] not in message and ids[5] not in message  # only the bad ids, not the whole batch


def test_bank_dimension_similarity_and_fingerprint_mismatch_are_refused(tmp_path):
    images, train, _ = make_world(n_images=12, n_train=6, n_val=2)
    ids = list(images)
    model = make_model(dim=16)
    bank = NegativeBank.build(model, ids, images, batch_size=5, show_progress=False)
    sample = images[ids[0]][None]
    bank.check_compatible(model, sample=sample)  # its own model passes
    cases = {
        "embedding shape": make_model(dim=8),
        "similarity": make_model(dim=16, tokens_per_image=2),
        "fingerprint": make_model(dim=16, seed=5),
    }
    for word, other in cases.items():
        with pytest.raises(BankMismatchError, match=word):
            bank.check_compatible(other, sample=sample)
    # and the trainer refuses a stale bank before training a single step
    with pytest.raises(BankMismatchError):
        Stage2Trainer(make_model(dim=16, seed=5), bank, train, images,
                      config=Stage2Config(batch_size=4, epochs=1, show_progress=False))
    # a bank file whose metadata was tampered with is refused as corrupt, not half-read
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    header["__metadata__"]["shape"] = json.dumps([99, 16])
    new_header = json.dumps(header).encode()
    new_header += b" " * ((8 - len(new_header) % 8) % 8)
    path.write_bytes(len(new_header).to_bytes(8, "little") + new_header + raw[8 + header_len:])
    with pytest.raises(DataError, match="does not match its checksum"):
        NegativeBank.load(path)
    _rewrite_metadata(path)  # a forger who also recomputes the checksum still meets the shape check
    with pytest.raises(DataError, match="disagrees with its metadata"):
        NegativeBank.load(path)
    path.write_bytes(raw[: len(raw) // 2])  # truncated file
    with pytest.raises(DataError, match="not a readable safetensors"):
        NegativeBank.load(path)


def test_unknown_triplet_ids_are_named_before_training():
    images, train, _ = make_world(n_images=12, n_train=6, n_val=2)
    model = make_model()
    bank = NegativeBank.build(model, list(images), images, batch_size=5, show_progress=False)
    bad = list(train) + [type(train[0])("img_not_there", ("red",), train[0].target)]
    with pytest.raises(DataError, match="img_not_there"):
        Stage2Trainer(model, bank, bad, images, config=Stage2Config(batch_size=4, epochs=1, show_progress=False))


def _rewrite_metadata(path: Path, *, forge_checksum: bool = True, **changes: str) -> None:
    """Edit a safetensors file's string metadata in place (a tampered or foreign file); by default the
    checksum is recomputed as a careful forger would, so the checks behind it are what refuses the file."""
    from safetensors.torch import load_file

    from cir_plugins.negatives.bank_format import checksum

    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    header["__metadata__"].update(changes)
    if forge_checksum:
        header["__metadata__"]["checksum"] = checksum(load_file(str(path))["embeddings"], header["__metadata__"])
    new_header = json.dumps(header).encode()
    new_header += b" " * ((8 - len(new_header) % 8) % 8)
    path.write_bytes(len(new_header).to_bytes(8, "little") + new_header + raw[8 + header_len:])


@pytest.mark.parametrize("field,value", [("ids", "5"), ("ids", '[1, 2]'), ("rows", '"abc"'), ("rows", "[true]"),
                                         ("shape", '{"a": 1}'), ("ids", "not json")])
def test_bank_metadata_of_the_wrong_type_is_a_clear_error(tmp_path, field, value):
    images, _, _ = make_world(n_images=6, n_train=2, n_val=2)
    bank = NegativeBank.build(make_model(), list(images), images, batch_size=4, show_progress=False)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    _rewrite_metadata(path, **{field: value})
    with pytest.raises(DataError, match="metadata"):
        NegativeBank.load(path)
