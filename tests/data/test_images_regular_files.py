"""The one checked open (data.images.open_image_file): only regular files are read, so a FIFO, a directory or a
socket in place of an image is a clear ImageLoadError at once (never a hang) that the skip options drop; a
symlink swapped in after the store was made is refused by every read, the served bytes included; the served
format comes from the file's header, never from its name; upload decoders are limited to an allow-list."""

from __future__ import annotations

import io
import os
import socket

import numpy as np
import pytest
from PIL import Image

from cir_plugins.data.images import ImageStore, decode_image, open_image_file
from cir_plugins.errors import ImageLoadError, UnsafePathError


def _png(path, seed=0, size=(6, 5)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "PNG")


@pytest.fixture()
def root(tmp_path):
    for i, name in enumerate(("a", "b", "c")):
        _png(tmp_path / f"{name}.png", seed=i)
    return tmp_path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_in_place_of_an_image_is_refused_at_once_and_skipped(root, within):
    store = ImageStore(root, {"a": "a.png", "b": "b.png", "c": "c.png"}, "none")
    (root / "b.png").unlink()
    os.mkfifo(root / "b.png")  # no writer will ever come: a blocking open waits forever
    finished, outcome = within(30, lambda: store.load_pil("b"))
    assert finished, "reading a FIFO blocked"
    assert isinstance(outcome, ImageLoadError) and "not a regular file (it is a FIFO)" in str(outcome)
    finished, kept = within(30, store.readable_ids)
    assert finished and kept == ["a", "c"]
    finished, outcome = within(30, lambda: store.batch(["a", "b", "c"], on_error="skip"))
    assert finished and outcome[1] == ["a", "c"]
    finished, outcome = within(30, lambda: store.read_file("b"))
    assert finished and isinstance(outcome, ImageLoadError)


def test_a_directory_or_socket_in_place_of_an_image_is_an_image_error_that_skip_drops(root):
    store = ImageStore(root, {"a": "a.png", "b": "b.png", "c": "c.png"}, "none")
    (root / "b.png").unlink()
    (root / "b.png").mkdir()
    with pytest.raises(ImageLoadError, match=r"image 'b' is not a regular file \(it is a directory\)"):
        store.load_pil("b")
    assert store.readable_ids() == ["a", "c"]
    tensors, kept = store.batch(["a", "b", "c"], on_error="skip")
    assert kept == ["a", "c"] and tensors.shape[0] == 2
    if hasattr(socket, "AF_UNIX"):
        (root / "c.png").unlink()
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(root / "c.png"))
            with pytest.raises(ImageLoadError, match="image 'c'"):
                store.load_pil("c")
            assert store.readable_ids() == ["a"]


def test_open_image_file_reads_regular_files_only(root):
    with open_image_file(root / "a.png", what="the file") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ImageLoadError, match="the folder is not a regular file"):
        open_image_file(root, what="the folder")
    (root / "zero.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        open_image_file(root / "zero.png", what="zero")
    (root / "link.png").symlink_to(root / "a.png")
    with pytest.raises(ImageLoadError, match="cannot be opened"):  # O_NOFOLLOW: a final symlink is not followed
        open_image_file(root / "link.png", what="link")


def test_a_symlink_swapped_in_after_the_store_was_made_is_refused_by_every_read(root, tmp_path_factory):
    secret = tmp_path_factory.mktemp("outside") / "secret.png"
    _png(secret, seed=9)
    store = ImageStore(root, {"a": "a.png", "b": "b.png"}, "none")
    (root / "b.png").unlink()
    (root / "b.png").symlink_to(secret)
    for read in (store.load_pil, store.read_file):
        with pytest.raises(UnsafePathError, match="outside the dataset root"):
            read("b")


def test_a_nul_in_a_path_is_a_path_error_not_a_bare_value_error(root):
    with pytest.raises(UnsafePathError, match="NUL"):
        ImageStore(root, {"a": "a\x00.png"}, "none")
    store = ImageStore(root, {"a": "a.png"}, "none")
    with pytest.raises(UnsafePathError, match="NUL"):
        store.load_relative("a.png\x00../x")


def test_read_file_names_the_format_of_the_bytes_not_of_the_name(root):
    payload = io.BytesIO()
    Image.new("RGB", (3, 3), (200, 10, 10)).save(payload, "PNG")
    (root / "evil.html").write_bytes(payload.getvalue() + b"<script>alert(1)</script>")
    store = ImageStore(root, {"a": "a.png", "evil": "evil.html"}, "none")
    data, kind = store.read_file("evil")
    assert kind == "PNG" and data.endswith(b"</script>")
    assert store.read_file("a") == ((root / "a.png").read_bytes(), "PNG")
    (root / "notes.png").write_text("<html>not an image</html>")
    with pytest.raises(ImageLoadError, match="not a readable image"):
        ImageStore(root, {"n": "notes.png"}, "none").read_file("n")


def test_decode_image_tries_only_the_formats_it_is_given(root):
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tiff, "TIFF")
    assert decode_image(io.BytesIO(tiff.getvalue()), what="x").size == (4, 4)  # every decoder by default
    with pytest.raises(ImageLoadError, match=r"not a readable image \(accepted: PNG, JPEG\)"):
        decode_image(io.BytesIO(tiff.getvalue()), what="the upload", formats=("PNG", "JPEG"))
    png = (root / "a.png").read_bytes()
    assert decode_image(io.BytesIO(png), what="x", formats=("PNG",)).size == (6, 5)
    store = ImageStore(root, {"a": "a.png"}, "none")
    (root / "t.tif").write_bytes(tiff.getvalue())
    with pytest.raises(ImageLoadError, match="accepted: PNG"):
        store.load_relative("t.tif", formats=("PNG",))
    assert store.load_relative("t.tif").size == (4, 4)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_build_bank_skip_unreadable_skips_a_fifo_and_a_directory_instead_of_hanging(tmp_path, capsys, within):
    from pathlib import Path

    import cir_plugins as cp
    from cir_plugins.cli import main
    from cir_plugins.data.fixtures import build_cirr_tree

    root = build_cirr_tree(tmp_path / "root", splits=("train",))
    ids = list(cp.load_cirr(root, "train").gallery_ids)
    paths = {i: cp.load_cirr(root, "train").images.path_of(i) for i in ids}
    paths[ids[2]].unlink()
    os.mkfifo(paths[ids[2]])
    paths[ids[4]].unlink()
    paths[ids[4]].mkdir()
    tests = Path(__file__).resolve().parents[1]
    (tmp_path / "factory.py").write_text(f"import sys\nsys.path.insert(0, {str(tests)!r})\n"
                                         "from _toy import make_model\n\n\ndef build():\n"
                                         "    return make_model(dim=16, seed=3)\n")
    argv = ["build-bank", "--model", f"{tmp_path / 'factory.py'}:build", "--dataset", "cirr", "--root", str(root),
            "--image-size", "4", "--out", str(tmp_path / "bank.safetensors"), "--no-progress"]
    finished, code = within(60, lambda: main(argv))
    assert finished and code == 2  # stops at the first unreadable image by default, naming it
    assert "not a regular file" in capsys.readouterr().err
    finished, code = within(60, lambda: main(argv + ["--skip-unreadable"]))
    assert finished and code == 0, capsys.readouterr().err
    bank = cp.NegativeBank.load(tmp_path / "bank.safetensors")
    assert ids[2] not in bank and ids[4] not in bank and len(bank.ids) == len(ids) - 2
