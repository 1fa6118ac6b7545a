"""ImageStore and the preprocessing transforms."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cir_plugins.data.images import CLIP_MEAN, CLIP_STD, ClipTransform, ImageStore, make_transform, to_rgb
from cir_plugins.errors import ConfigError, ImageLoadError, UnsafePathError


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


@pytest.fixture()
def store_root(tmp_path):
    rng = np.random.default_rng(0)
    _save(tmp_path / "a.png", rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    _save(tmp_path / "sub" / "b.jpg", rng.integers(0, 256, (40, 20, 3), dtype=np.uint8))
    return tmp_path


def test_mapping_and_extras(store_root):
    store = ImageStore(store_root, {"a": "a.png", "b": "./sub/b.jpg"}, "clip", size=16)
    assert len(store) == 2 and list(store) == ["a", "b"] and store.ids == ["a", "b"]
    assert "a" in store and "zzz" not in store
    assert store["a"].shape == (3, 16, 16) and store["a"].dtype == torch.float32
    assert store.path_of("b") == (store_root / "sub" / "b.jpg").resolve()
    assert store.load_pil("a").mode == "RGB" and store.load_pil("a").size == (50, 30)
    batch = store.batch(["b", "a"])
    assert batch.shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch[1], store["a"])
    raw = store.with_transform("none")
    assert raw["a"].shape == (3, 30, 50) and float(raw["a"].min()) >= 0 and float(raw["a"].max()) <= 1
    assert store["a"].shape == (3, 16, 16)  # the original is unchanged
    clone = pickle.loads(pickle.dumps(store))
    torch.testing.assert_close(clone["b"], store["b"])
    with pytest.raises(KeyError):
        store["zzz"]


def test_clip_transform_matches_plain_reference(store_root):
    """Resize shorter side (bicubic), centre-crop, normalise: against a hand-written version."""
    image = Image.open(store_root / "a.png").convert("RGB")  # 50 x 30
    out = ClipTransform("clip", 15)(image)
    resized = image.resize((25, 15), Image.BICUBIC)  # shorter side 30 -> 15, so 50 -> 25
    cropped = np.asarray(resized, dtype=np.float32)[:, 5:20] / 255.0  # (15, 15, 3): left = (25 - 15) // 2
    expected = (cropped - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(2, 0, 1))


def test_targetpad_and_squarepad_pad_the_short_side():
    white = Image.new("RGB", (40, 10), (255, 255, 255))  # ratio 4 > 1.25
    out = ClipTransform("targetpad", 32, target_ratio=1.25)(white)
    raw = out * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    # padded to 40 x 32 (ratio 1.25), black rows above and below the 10-px white band
    assert raw[:, 0].max() < 0.05 and raw[:, -1].max() < 0.05 and raw[:, 16].min() > 0.95
    square = ClipTransform("squarepad", 40)(white)
    raw_sq = square * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    # square pad keeps the full width: white band spans every column
    assert raw_sq[:, 20, :].min() > 0.95 and raw_sq[:, 2].max() < 0.05
    # a ratio already <= 1.25 is untouched by targetpad
    near = Image.new("RGB", (30, 26), (255, 255, 255))
    torch.testing.assert_close(ClipTransform("targetpad", 20)(near), ClipTransform("clip", 20)(near))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1"])
def test_modes_convert_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    rgb.convert(mode).save(path)
    store = ImageStore(tmp_path, {"x": path.name}, "none")
    assert store.load_pil("x").mode == "RGB" and store["x"].shape == (3, 9, 11)


def test_16_bit_and_32_bit_images_scale_to_8_bit(tmp_path):
    array16 = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(array16).save(tmp_path / "d16.png")  # mode I;16
    out = to_rgb(Image.open(tmp_path / "d16.png"))
    assert out.mode == "RGB"
    assert np.asarray(out)[:, :, 0].tolist() == [[0, 255], [128, 4]]
    array32 = np.array([[0, 100], [200, 255]], dtype=np.int32)
    out32 = to_rgb(Image.fromarray(array32, "I"))
    assert np.asarray(out32)[:, :, 1].tolist() == [[0, 100], [200, 255]]


def test_errors_name_id_path_and_fix(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all" * 10)
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    store = ImageStore(tmp_path, {"missing": "missing.png", "empty": "empty.png", "trunc": "trunc.png",
                                  "junk": "junk.jpg", "big": "big.png"}, "none", max_pixels=5000)
    for image_id, words in [("missing", "missing"), ("empty", "zero-byte"), ("trunc", "cannot be decoded"),
                            ("junk", "cannot be decoded"), ("big", "pixel limit")]:
        with pytest.raises(ImageLoadError) as info:
            store[image_id]
        message = str(info.value)
        assert image_id in message and words in message and "Fix:" in message
        assert str(store.path_of(image_id)) in message
    assert isinstance(info.value, OSError)  # callers catching OSError still work
    # the limit is ours, configurable, and restored in PIL afterwards
    before = Image.MAX_IMAGE_PIXELS
    assert store.with_transform("none").max_pixels == 5000
    relaxed = ImageStore(tmp_path, {"big": "big.png"}, "none", max_pixels=20000)
    assert relaxed["big"].shape == (3, 100, 100)
    assert Image.MAX_IMAGE_PIXELS == before


def test_on_error_skip_drops_unreadable_in_batch(tmp_path):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"")
    store = ImageStore(tmp_path, {"ok": "ok.png", "bad": "bad.png"}, "none", on_error="skip")
    batch, kept = store.batch(["bad", "ok"])
    assert kept == ["ok"] and batch.shape == (1, 3, 8, 8)
    assert store.readable_ids() == ["ok"]
    with pytest.raises(ImageLoadError):
        store["bad"]  # a Mapping lookup always raises
    with pytest.raises(ImageLoadError):
        store.batch(["bad"], on_error="error")


def test_paths_may_not_leave_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    for bad in ["../outside.png", str(tmp_path / "outside.png"), "./a/../../outside.png"]:
        with pytest.raises(UnsafePathError) as info:
            ImageStore(root, {"x": bad}, "none", source="file.json")
        assert "'x'" in str(info.value) and "file.json" in str(info.value)
    os.symlink(tmp_path / "outside.png", root / "link.png")
    with pytest.raises(UnsafePathError, match="symlink"):
        ImageStore(root, {"x": "link.png"}, "none")


def test_bad_arguments():
    with pytest.raises(ConfigError):
        make_transform("bilinear")
    with pytest.raises(ConfigError):
        ClipTransform("clip", 0)
    with pytest.raises(ImageLoadError):
        ImageStore("/definitely/not/here", {}, "none")


def test_to_pil_min_max_scales_tensors_and_arrays_in_either_layout():
    from cir_plugins.data.images import to_pil
    from cir_plugins.errors import DataError

    chw = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]] * 3) - 1.0  # (3, 2, 2), values -1 .. 3
    image = to_pil(chw)
    assert image.mode == "RGB" and image.size == (2, 2)
    assert np.asarray(image)[..., 0].tolist() == [[0, 64], [128, 255]]  # (v + 1) / 4 * 255, rounded
    assert np.asarray(to_pil(chw.permute(1, 2, 0).numpy())).tolist() == np.asarray(image).tolist()  # (H, W, C)
    gray = to_pil(chw[:1])  # one channel -> grey RGB
    assert np.asarray(gray)[..., 2].tolist() == [[0, 64], [128, 255]]
    assert np.asarray(to_pil(torch.zeros(3, 2, 2))).max() == 0  # constant image: black, no division by zero
    assert to_pil(Image.new("L", (3, 1))).mode == "RGB"
    with pytest.raises(DataError, match="cannot turn this image"):
        to_pil(torch.zeros(2, 2))
