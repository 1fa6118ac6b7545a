"""Bank files read in slices (issue 29, item 1, the format's part): block checksums, a slice read that verifies
only the blocks it touches, files without block checksums, bad bounds, and 2 gloo ranks whose slices make up
one process's full read while each holds about half the rows in host memory."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _gloo import spawn_gloo
from safetensors.torch import save
from test_reliability_bank import _rewrite_metadata

from cir_plugins._atomic import atomic_write_bytes
from cir_plugins._utils import shard_rows
from cir_plugins.errors import ConfigError, DataError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.negatives.bank_format import checksum, checksummed_metadata, read_bank_file

F32, BF16 = torch.float32, torch.bfloat16


def _bank(n: int, d: int = 6, tokens: int | None = None, dtype=F32, seed: int = 0) -> NegativeBank:
    """Random unit rows; a third as many extra ids are duplicates sharing a random row."""
    generator = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, *((tokens,) if tokens else ()), d, generator=generator), dim=-1).to(dtype)
    dupes = torch.randint(0, n, (n // 3,), generator=generator).tolist()
    return NegativeBank(emb, [f"im{i}" for i in range(n)] + [f"dup{i}" for i in range(len(dupes))],
                        list(range(n)) + dupes, similarity="max_token" if tokens else "dot", fingerprint="test")


def _write(path: Path, bank: NegativeBank, block_rows: int | None = None) -> dict:
    """The bank in the format with block checksums (``block_rows``), or in today's (None: whole-file checksum)."""
    meta = {k: v for k, v in bank.metadata().items() if k not in ("block_rows", "block_checksums", "header_checksum")}
    if block_rows is None:
        meta["checksum"] = checksum(bank.embeddings, meta)
    else:
        meta = checksummed_metadata(bank.embeddings, meta, block_rows=block_rows)
    atomic_write_bytes(path, save({"embeddings": bank.embeddings.contiguous()}, metadata=meta))
    return meta


def _flip(path: Path, row: int) -> None:
    """Flip the lowest bit of the first value of ``row`` in place: the row stays unit length within tolerance, so
    only a checksum can notice."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    stored = json.loads(raw[8:8 + header_len])["embeddings"]
    raw[8 + header_len + row * (stored["data_offsets"][1] // stored["shape"][0])] ^= 1
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("n, block_rows, tokens, dtype", [
    (1, 4, None, F32), (7, 3, None, BF16), (97, 8, None, F32), (50, 7, 3, F32), (4099, 4096, None, BF16)])
def test_every_slice_equals_its_rows_of_a_full_read(tmp_path, n, block_rows, tokens, dtype):
    bank = _bank(n, tokens=tokens, dtype=dtype, seed=n)
    path = tmp_path / "bank.safetensors"
    meta = _write(path, bank, block_rows)
    assert meta["checksum"] == checksum(bank.embeddings, meta)  # what readers of the format before blocks check
    full, ids, rows, full_meta = read_bank_file(path)
    assert torch.equal(full, bank.embeddings) and ids == bank.ids and full_meta == meta
    for world in (1, 2, 3, 5, 8):
        parts = []
        for rank in range(world):
            part, part_ids, part_rows, part_meta = read_bank_file(path, shard=(rank, world))
            start, stop = shard_rows(n, rank, world)
            assert torch.equal(part, full[start:stop]), (rank, world)
            assert (part_ids, part_rows, part_meta) == (ids, rows, meta)  # the whole id -> row map, global rows
            parts.append(part)
        assert torch.equal(torch.cat(parts), full)
    draw = random.Random(n)
    for _ in range(20):
        start = draw.randint(0, n)
        stop = draw.randint(start, n)
        assert torch.equal(read_bank_file(path, span=(start, stop))[0], full[start:stop]), (start, stop)


def test_a_corrupted_block_is_refused_by_its_readers_and_no_other(tmp_path):
    bank = _bank(40)
    path = tmp_path / "bank.safetensors"
    _write(path, bank, block_rows=8)  # blocks 0..4: rows 0-7, ..., 32-39
    _flip(path, row=35)
    for span in [(34, 36), (31, 33), (20, 40)]:  # each touches block 4
        with pytest.raises(DataError, match=r"bank.safetensors: the bank does not match its checksum \(block 4, "
                                            r"rows 32\.\.39"):
            read_bank_file(path, span=span)
    with pytest.raises(DataError, match="block 4"):
        read_bank_file(path, shard=(1, 2))  # rows 20..39
    for span in [(0, 32), (8, 9), (32, 32)]:  # blocks 0..3, or nothing: read and equal to the rows written
        assert torch.equal(read_bank_file(path, span=span)[0], bank.embeddings[span[0]:span[1]])
    assert torch.equal(read_bank_file(path, shard=(0, 2))[0], bank.embeddings[:20])
    with pytest.raises(DataError, match="does not match its checksum"):  # a full read checks the whole file
        read_bank_file(path)


def test_an_edited_header_is_refused_by_every_slice_reader(tmp_path):
    bank = _bank(20)
    path = tmp_path / "bank.safetensors"
    _write(path, bank, block_rows=8)
    # an id renamed and the whole-file checksum recomputed: the header checksum still refuses it for any slice
    _rewrite_metadata(path, ids=json.dumps(["x" + i for i in bank.ids]))
    for bounds in [dict(span=(0, 1)), dict(shard=(1, 2)), dict(span=(5, 5))]:
        with pytest.raises(DataError, match=r"does not match its checksum \(its header"):
            read_bank_file(path, **bounds)
    _write(path, bank, block_rows=8)
    _rewrite_metadata(path, forge_checksum=False, block_checksums=json.dumps(["0" * 64] * 3))
    with pytest.raises(DataError, match=r"its header"):
        read_bank_file(path, span=(0, 1))


def test_a_file_without_block_checksums_loads_whole_and_in_slices_verifying_all_of_it(tmp_path, caplog):
    bank = _bank(30, tokens=2)
    path = tmp_path / "bank.safetensors"
    _write(path, bank)  # the format before block checksums
    assert torch.equal(read_bank_file(path)[0], bank.embeddings)
    with caplog.at_level(logging.WARNING, logger="cir_plugins.negatives.bank_format"):
        part, ids, _, _ = read_bank_file(path, shard=(1, 3))
    assert torch.equal(part, bank.embeddings[10:20]) and ids == bank.ids
    assert "no block checksums: verifying the whole file to read rows [10, 20]" in caplog.text
    _flip(path, row=0)  # outside the slice: still refused, the whole file is what such a file can verify
    with pytest.raises(DataError, match="does not match its checksum"):
        read_bank_file(path, shard=(2, 3))
    # a version-1 file (no checksum at all) loads in slices too, saying it cannot be verified
    meta = {k: v for k, v in bank.metadata().items() if k not in ("checksum", "block_rows", "block_checksums",
                                                                  "header_checksum")}
    atomic_write_bytes(path, save({"embeddings": bank.embeddings}, metadata=meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cir_plugins.negatives.bank_format"):
        assert torch.equal(read_bank_file(path, span=(3, 9))[0], bank.embeddings[3:9])
    assert "before banks carried a checksum" in caplog.text


@pytest.mark.parametrize("bounds, match", [
    (dict(span=(-1, 3)), r"span must be \(start, stop\).*got \(-1, 3\).*0 <= start <= stop <= 10"),
    (dict(span=(4, 3)), r"got \(4, 3\)"), (dict(span=(0, 11)), r"got \(0, 11\)"), (dict(span=(0.0, 2)), "ints"),
    (dict(span=5), "span must be"), (dict(shard=(2, 2)), r"0 <= rank < world.*rank=2, world=2"),
    (dict(shard=3), r"shard must be \(rank, world\)"), (dict(span=(0, 1), shard=(0, 1)), "not both")])
def test_bad_bounds_are_a_clear_error(tmp_path, bounds, match):
    path = tmp_path / "bank.safetensors"
    _write(path, _bank(10), block_rows=4)
    with pytest.raises(ConfigError, match=match):
        read_bank_file(path, **bounds)


# -- 2 gloo ranks ---------------------------------------------------------------------------------------------


def _peak_since(start: bool = False) -> int:
    """Peak resident bytes of this process (Linux's VmHWM) since the last call with ``start=True``."""
    if start:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the current resident set
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _ranks_read_their_slices(rank: int, world: int, folder: str) -> None:
    path = Path(folder) / "bank.safetensors"
    size = path.stat().st_size
    before = _peak_since(start=True)
    part, ids, rows, meta = read_bank_file(path, shard=(rank, world))
    slice_peak = _peak_since() - before
    n = json.loads(meta["shape"])[0]
    start, stop = shard_rows(n, rank, world)
    longest = shard_rows(n, 0, world)[1]
    padded = torch.zeros(longest, *part.shape[1:], dtype=part.dtype)
    padded[:len(part)] = part
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    joined = torch.cat([g[:b - a] for g, (a, b) in zip(gathered, (shard_rows(n, r, world) for r in range(world)))])
    del gathered, padded
    before = _peak_since(start=True)
    full, full_ids, full_rows, _ = read_bank_file(path)
    full_peak = _peak_since() - before
    assert torch.equal(joined, full) and (ids, rows) == (full_ids, full_rows)
    assert len(part) == stop - start
    # peak host memory of the read: the slice (about half the rows), at most two partial blocks and the metadata
    # and first-call costs (about 15 MiB here in all), against the whole file for a full read
    block = 256 * part[0].numel() * part.element_size()
    assert slice_peak < 0.5 * size + 2 * block + (24 << 20), (slice_peak, size)
    assert full_peak > 0.9 * size, (full_peak, size)  # the measurement sees a whole read


def test_two_gloo_ranks_each_read_half_and_together_equal_one_full_read(tmp_path):
    bank = _bank(16383, d=2048)  # 128 MiB of float32 rows, an odd count
    _write(tmp_path / "bank.safetensors", bank, block_rows=256)
    spawn_gloo(_ranks_read_their_slices, tmp_path, world=2)


def test_a_bank_loaded_as_a_slice_keeps_global_rows_and_refuses_to_be_saved(tmp_path):
    from cir_plugins._utils import shard_rows
    from cir_plugins.errors import ConfigError
    from cir_plugins.negatives.distributed import BankShard

    bank = _bank(n=23, d=6)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    whole = NegativeBank.load(path)
    for rank in range(3):
        part = NegativeBank.load(path, shard=(rank, 3))
        start, stop = shard_rows(23, rank, 3)
        assert part.shard == BankShard(start, 23) and len(part) == len(whole) == 23
        assert torch.equal(part.embeddings, whole.embeddings[start:stop])
        assert torch.equal(part.rows_of(whole.ids), whole.rows_of(whole.ids))  # global rows, every id
        assert part.to(dtype=torch.bfloat16).shard == part.shard
        with pytest.raises(ConfigError, match="slice"):
            part.save(tmp_path / "part.safetensors")
