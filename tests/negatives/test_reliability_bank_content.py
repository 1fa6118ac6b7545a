"""Reliability of banks, second pass (issue 18, items 5, 9, 12): the shard cache reuses a row only when
everything that changes it matches; bank files carry a checksum and unit-length rows, verified at load; missing
metadata keys and deeply nested ids are the library's errors; a save failing on a full disk leaves no temp file."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _toy import ToyCIRWithReference, make_model, make_world
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save
from test_reliability_bank import _rewrite_metadata

import cir_plugins._atomic as atomic
from cir_plugins.data.images import ImageStore
from cir_plugins.errors import DataError
from cir_plugins.negatives.bank import NegativeBank
from cir_plugins.negatives.bank_format import UNIT_TOLERANCE, checksum


class PooledToy(ToyCIRWithReference):
    """The toy model on images of any size: average-pooled to 4 x 4 first."""

    def encode_image(self, images):
        return super().encode_image(F.adaptive_avg_pool2d(images, 4))

    def _reference(self, images):
        return super()._reference(F.adaptive_avg_pool2d(images, 4))


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(9):
        pixels = (torch.rand(30, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(root / f"im{i}.png")
    return root


def _store(root, transform="clip", size=16):
    return ImageStore(root, {f"im{i}": f"im{i}.png" for i in range(9)}, transform, size=size)


def _build(store, cache=None, dtype=None):
    return NegativeBank.build(PooledToy(), store.ids, store, batch_size=4, show_progress=False, dedup=False,
                              cache_dir=cache, dtype=dtype)


# -- item 5: the shard cache is keyed on everything that changes a row --------------------------------------------


@pytest.mark.parametrize("first, second, differs", [
    (dict(size=16), dict(size=32), "preprocessing"),
    (dict(transform="clip"), dict(transform="squarepad"), "preprocessing"),
    (dict(dtype="bfloat16"), dict(dtype="float32"), "dtype"),
])
def test_shards_made_with_other_preprocessing_or_dtype_are_not_reused(image_root, tmp_path, caplog, first, second,
                                                                     differs):
    cache = tmp_path / "cache"

    def build(settings, cache_dir):
        store = _store(image_root, settings.get("transform", "clip"), settings.get("size", 16))
        return _build(store, cache_dir, settings.get("dtype"))

    build(first, cache)
    with caplog.at_level(logging.INFO, logger="cir_plugins.negatives.bank"):
        again = build(second, cache)
    assert "(0 re-used from the shard cache)" in caplog.text
    assert f"made with other {differs}" in caplog.text
    fresh = build(second, None)
    assert again.dtype == fresh.dtype and torch.equal(again.embeddings, fresh.embeddings)
    # the positive control: the same settings again reuse every row, bit for bit
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cir_plugins.negatives.bank"):
        third = build(second, cache)
    assert "(9 re-used from the shard cache)" in caplog.text
    assert torch.equal(third.embeddings, fresh.embeddings)


def test_a_changed_image_file_invalidates_the_shards(image_root, tmp_path, caplog):
    cache = tmp_path / "cache"
    _build(_store(image_root), cache)
    Image.new("RGB", (40, 30), (255, 255, 255)).save(image_root / "im3.png")
    with caplog.at_level(logging.INFO, logger="cir_plugins.negatives.bank"):
        again = _build(_store(image_root), cache)
    assert "made with other files" in caplog.text
    assert torch.equal(again.embeddings, _build(_store(image_root)).embeddings)


def test_an_edited_shard_with_rows_off_unit_length_is_refused(image_root, tmp_path):
    cache = tmp_path / "cache"
    _build(_store(image_root), cache)
    shard = sorted(cache.glob("rows-*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as opened:
        meta = opened.metadata()
    tensors = load_file(str(shard))
    shard.write_bytes(save({"rows": tensors["rows"], "embeddings": tensors["embeddings"] * 100}, metadata=meta))
    with pytest.raises(DataError, match=r"shard cache .*not unit length.*\(images \['im0'"):
        _build(_store(image_root), cache)


# -- item 9: checksum, unit rows, metadata keys, nesting ---------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    images, _, _ = make_world(n_images=11, n_train=2, n_val=2)
    bank = NegativeBank.build(make_model(), list(images), images, batch_size=4, show_progress=False)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    return bank, path


def test_a_flipped_data_bit_or_an_edited_id_is_refused_by_the_checksum(saved):
    bank, path = saved
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[-5] ^= 0x01  # one bit of the last row
    path.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=r"bank.safetensors: the bank does not match its checksum"):
        NegativeBank.load(path)
    path.write_bytes(raw)
    _rewrite_metadata(path, forge_checksum=False, ids=json.dumps(["x" + i for i in bank.ids]))
    with pytest.raises(DataError, match="does not match its checksum"):
        NegativeBank.load(path)


@pytest.mark.parametrize("scale", [100.0, 0.0, 0.98])
def test_rows_off_unit_length_are_refused_at_load(saved, scale):
    bank, path = saved
    embeddings = bank.embeddings * scale
    meta = bank.metadata()
    meta["checksum"] = checksum(embeddings, meta)  # forged: only the unit-length check can refuse it
    path.write_bytes(save({"embeddings": embeddings.contiguous()}, metadata=meta))
    with pytest.raises(DataError, match=r"bank rows are not unit length.*rows \[0, 1, 2.*\(images \['img000'"):
        NegativeBank.load(path)


def test_the_stated_tolerance_lets_normalised_low_precision_rows_through(tmp_path):
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for dim in (3, 64, 1024):
            rows = F.normalize(torch.randn(200, dim, generator=generator) * 50, dim=-1).to(dtype)
            worst = float((rows.float().norm(dim=-1) - 1).abs().max())
            assert worst <= UNIT_TOLERANCE[dtype] / 2, (dtype, dim, worst)
            bank = NegativeBank(rows, [str(i) for i in range(200)], list(range(200)), similarity="dot", fingerprint="f")
            bank.save(tmp_path / "b.safetensors")
            assert torch.equal(NegativeBank.load(tmp_path / "b.safetensors").embeddings, rows)


def test_multi_vector_rows_allow_zero_padding_tokens_but_not_all_zero_rows(tmp_path):
    rows = F.normalize(torch.randn(4, 3, 8), dim=-1)
    rows[1, 2] = 0  # a padding token
    bank = NegativeBank(rows, list("abcd"), [0, 1, 2, 3], similarity="max_token", fingerprint="f")
    bank.save(tmp_path / "m.safetensors")
    assert torch.equal(NegativeBank.load(tmp_path / "m.safetensors").embeddings, rows)
    rows[2] = 0
    NegativeBank(rows, list("abcd"), [0, 1, 2, 3], similarity="max_token", fingerprint="f").save(
        tmp_path / "z.safetensors"
    )
    with pytest.raises(DataError, match=r"rows \[2\]"):
        NegativeBank.load(tmp_path / "z.safetensors")


@pytest.mark.parametrize("key", ["similarity", "fingerprint", "dtype", "version"])
def test_a_missing_metadata_key_is_named(saved, key):
    _, path = saved
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    meta = header["__metadata__"]
    del meta[key]
    embeddings = load_file(str(path))["embeddings"]
    meta["checksum"] = checksum(embeddings, meta)
    path.write_bytes(save({"embeddings": embeddings}, metadata=meta))
    with pytest.raises(DataError, match=rf"lacks required keys; got \['{key}'\]"):
        NegativeBank.load(path)


def test_deeply_nested_ids_are_a_data_error(saved):
    _, path = saved
    _rewrite_metadata(path, ids="[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"bank.safetensors: the bank metadata is corrupt; got 'RecursionError"):
        NegativeBank.load(path)


def test_a_bank_without_a_checksum_still_loads_with_a_warning(saved, caplog):
    bank, path = saved
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + header_len])["__metadata__"]
    del meta["checksum"]
    meta["version"] = "1"
    path.write_bytes(save({"embeddings": load_file(str(path))["embeddings"]}, metadata=meta))
    with caplog.at_level(logging.WARNING):
        loaded = NegativeBank.load(path)
    assert "before banks carried a checksum" in caplog.text
    assert torch.equal(loaded.embeddings, bank.embeddings)


# -- item 12: a save failing on a full disk removes its temp file ------------------------------------------------


def test_a_bank_save_failing_on_a_full_disk_removes_its_temp_file_and_keeps_the_old_bank(saved, monkeypatch):
    bank, path = saved
    before = path.read_bytes()
    real_open = open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(atomic, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError) as caught:
        bank.save(path)
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["bank.safetensors"]  # no temp file left
    assert path.read_bytes() == before
