"""Reliability of image reading, second pass (issue 18, items 1, 10, 11): thin images that a transform would
blow up past the pixel limit, paths swapped for a symlink leading out after the store was made, and paths that
cannot be resolved at all (a name over the filesystem's limit, a symlink loop)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from PIL import Image

from cir_plugins.data.images import ClipTransform, ImageStore
from cir_plugins.errors import ImageLoadError, UnsafePathError


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "root"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "ok.png")
    return folder


@pytest.mark.parametrize("transform", ["clip", "targetpad", "squarepad"])
@pytest.mark.parametrize("size", [(200_000, 1), (20_000, 1), (1, 200_000)])
def test_a_thin_image_is_refused_before_the_transform_allocates(root, transform, size):
    Image.new("RGB", size).save(root / "thin.png")  # a few hundred bytes on disk
    assert (root / "thin.png").stat().st_size < 2000
    store = ImageStore(root, {"thin": "thin.png", "ok": "ok.png"}, transform, size=224)
    with pytest.raises(ImageLoadError, match=r"image 'thin' .* would grow past the pixel limit") as caught:
        store["thin"]
    assert "thin.png" in str(caught.value) and "max_pixels=64000000" in str(caught.value)
    # the skip paths drop it like any unreadable file
    assert store.readable_ids() == ["ok"]
    stacked, kept = store.batch(["thin", "ok"], on_error="skip")
    assert kept == ["ok"] and stacked.shape == (1, 3, 224, 224)


def test_the_overflowing_resize_is_refused_too(root):
    # 1 x 63,000,000 passes the source limit (63M < 64M pixels) but resizing asks for 224 x 14e9
    transform = ClipTransform("clip", 224)
    with pytest.raises(ImageLoadError, match=r"1x63000000 -> \d+ pixels"):
        transform.check_size(1, 63_000_000)
    assert transform.peak_pixels(1, 63_000_000) > 10**12


def test_peak_pixels_equals_the_images_the_transform_really_makes():
    """The bound is computed from sizes, not measured: check it against the PIL images actually made."""
    generator = torch.Generator().manual_seed(3)
    for kind in ("clip", "targetpad", "squarepad", "none"):
        transform = ClipTransform(kind, 17)
        for _ in range(12):
            w, h = (int(v) for v in torch.randint(1, 90, (2,), generator=generator))
            image = Image.new("RGB", (w, h))
            made = [w * h]
            real_resize, real_new = Image.Image.resize, Image.new

            def resize(self, new_size, *args, **kwargs):
                made.append(new_size[0] * new_size[1])
                return real_resize(self, new_size, *args, **kwargs)

            def new(mode, new_size, *args, **kwargs):
                made.append(new_size[0] * new_size[1])
                return real_new(mode, new_size, *args, **kwargs)

            Image.Image.resize, Image.new = resize, new
            try:
                transform(image)
            finally:
                Image.Image.resize, Image.new = real_resize, real_new
            assert transform.peak_pixels(w, h) == max(made), (kind, w, h)


def test_a_trusted_store_lifts_the_bound(root):
    Image.new("RGB", (3000, 1)).save(root / "thin.png")  # 3000 * 224 = 672k pixels after the resize
    with pytest.raises(ImageLoadError):
        ImageStore(root, {"thin": "thin.png"}, "clip", size=224, max_pixels=100_000)["thin"]
    assert ImageStore(root, {"thin": "thin.png"}, "clip", size=224, max_pixels=None)["thin"].shape == (3, 224, 224)


def test_a_file_replaced_by_a_symlink_out_of_the_root_after_loading_is_refused_on_read(root, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    store = ImageStore(root, {"ok": "ok.png"}, "none")
    assert store["ok"].shape == (3, 30, 40)
    (root / "ok.png").unlink()
    os.symlink(secret, root / "ok.png")
    with pytest.raises(UnsafePathError, match=r"image 'ok'.*resolves outside the dataset root"):
        store["ok"]
    with pytest.raises(UnsafePathError):
        store.load_pil("ok")


def test_a_symlink_swapped_in_between_the_check_and_the_open_is_not_followed(root, tmp_path, monkeypatch):
    import cir_plugins.data.images as images

    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    store = ImageStore(root, {"ok": "ok.png"}, "none")
    real = images.resolve_under_root

    def check_then_swap(*args, **kwargs):
        path = real(*args, **kwargs)
        (root / "ok.png").unlink()
        os.symlink(secret, root / "ok.png")  # the race: after the check, before the open
        return path

    monkeypatch.setattr(images, "resolve_under_root", check_then_swap)
    with pytest.raises(ImageLoadError, match=r"image 'ok' cannot be opened"):
        store["ok"]


def test_a_name_over_the_filesystem_limit_and_a_symlink_loop_name_the_image(root, caplog):
    with pytest.raises(ImageLoadError, match=r"the image root: the path cannot be resolved"):
        ImageStore(root / ("a" * 300), {"x": "x.png"})
    with pytest.raises(ImageLoadError, match=r"image 'x'.*cannot be resolved"):
        ImageStore(root, {"x": "a" * 300 + "/x.png"})
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    for rel in ("loop1", "loop1/x.png"):
        with pytest.raises(ImageLoadError, match=r"image 'x'.*(cannot be resolved|cannot be opened)"):
            ImageStore(root, {"x": rel})["x"]
    lazy = ImageStore(root, {"x": "b/" + "a" * 300 + ".png", "ok": "ok.png"}, check_paths=False)
    with caplog.at_level(logging.WARNING):
        assert lazy.readable_ids() == ["ok"]


def test_the_preprocessing_description_names_everything_that_changes_a_row(root):
    a = ImageStore(root, {"ok": "ok.png"}, "clip", size=16).preprocessing()
    assert a == ImageStore(root, {"ok": "ok.png"}, "clip", size=16).preprocessing()
    others = [ImageStore(root, {"ok": "ok.png"}, "clip", size=32).preprocessing(),
              ImageStore(root, {"ok": "ok.png"}, "targetpad", size=16).preprocessing(),
              ImageStore(root, {"ok": "ok.png"}, ClipTransform("clip", 16, mean=(0, 0, 0))).preprocessing()]
    assert all(o != a for o in others)
