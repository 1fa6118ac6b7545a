"""Reliability of data input: path confinement (property-based), the default decompression-bomb
limit, untrusted FashionIQ names, the caption cache cut at any byte, and empty texts.

Cases already covered elsewhere (corrupt / zero-byte / missing images, image modes, malformed JSON,
wrong field types, duplicate pair ids, unknown ids) live in test_data_images.py and
test_data_loaders.py; this file adds what those do not.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cir_plugins.data.fashioniq import load_fashioniq
from cir_plugins.data.fixtures import build_fashioniq_tree
from cir_plugins.data.images import DEFAULT_MAX_PIXELS, ImageStore, resolve_under_root
from cir_plugins.data.triplet import Triplet
from cir_plugins.errors import DataError, ImageLoadError, UnsafePathError
from cir_plugins.positives.captioners import CaptionCache

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

segment = st.sampled_from(["a", "b", "img.png", ".", "..", "", "c d", "é"])


@SETTINGS
@given(parts=st.lists(segment, min_size=1, max_size=6), absolute=st.booleans())
def test_property_paths_resolve_inside_the_root_or_are_refused(tmp_path, parts, absolute):
    root = (tmp_path / "root").resolve()
    root.mkdir(exist_ok=True)
    relative = "/".join(parts)
    if absolute:
        relative = "/" + relative
    # an empty first segment makes the path absolute too ("" + "/a" -> "/a")
    escapes = relative.startswith("/") or ".." in relative.split("/") or not relative
    if escapes:
        with pytest.raises(UnsafePathError):
            resolve_under_root(root, relative, what="image 'x'")
    else:
        resolved = resolve_under_root(root, relative, what="image 'x'")
        assert resolved == root or root in resolved.parents


def test_symlinked_folder_leading_out_is_refused(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "x.png")
    os.symlink(outside, root / "images" / "linked")
    with pytest.raises(UnsafePathError, match="outside the dataset root"):
        ImageStore(root, {"x": "images/linked/x.png"}, "none")
    # a store that skipped the construction-time check still refuses at load time
    lazy = ImageStore(root, {"x": "images/linked/x.png"}, "none", check_paths=False)
    with pytest.raises(UnsafePathError):
        lazy["x"]
    # a link that stays inside the root is fine
    Image.new("RGB", (4, 4)).save(root / "images" / "real.png")
    os.symlink(root / "images" / "real.png", root / "images" / "alias.png")
    assert ImageStore(root, {"y": "images/alias.png"}, "none")["y"].shape == (3, 4, 4)


def test_fashioniq_names_cannot_climb_out(tmp_path):
    root = tmp_path / "fiq"
    build_fashioniq_tree(root, categories=("dress",), splits=("val",))
    path = root / "image_splits" / "split.dress.val.json"
    names = json.loads(path.read_text())
    path.write_text(json.dumps(names + ["../../../etc/passwd"]))
    with pytest.raises(UnsafePathError) as caught:
        load_fashioniq(root, "dress", "val")
    assert "split.dress.val.json" in str(caught.value) and "passwd" in str(caught.value)


def test_default_pixel_limit_refuses_a_bomb_before_decoding(tmp_path):
    assert DEFAULT_MAX_PIXELS == 64_000_000
    # a 1-bit 9000 x 8000 image: a small PNG file that would decode to 72 M pixels (216 MB as RGB)
    Image.new("1", (9000, 8000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    store = ImageStore(tmp_path, {"bomb": "bomb.png"}, "none")
    with pytest.raises(ImageLoadError) as caught:
        store["bomb"]
    message = str(caught.value)
    assert "'bomb'" in message and "72000000" in message and "max_pixels" in message and "Fix:" in message
    kept = store.readable_ids()  # the skip route: counted out, logged, nothing raised
    assert kept == []


CAPTIONS = {f"im{k}": text for k, text in enumerate(["a red dress", "ünïcode ✓ caption", 'quote " and \\ slash',
                                                      "line\nbreak inside", "x" * 50])}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_property_caption_cache_cut_anywhere_reads_only_whole_records(tmp_path, cut):
    path = tmp_path / "cache.jsonl"
    if path.exists():
        path.unlink()
    cache = CaptionCache(path, "cap-v1")
    for image_id, caption in CAPTIONS.items():
        cache.append([(image_id, caption)])
    data = path.read_bytes()
    cut = cut % (len(data) + 1)
    path.write_bytes(data[:cut])  # a kill at any byte of any write
    reopened = CaptionCache(path, "cap-v1")
    # only records whose whole line (newline included) survived, each exactly as written
    whole = data[:cut].count(b"\n")
    assert reopened.captions == dict(list(CAPTIONS.items())[:whole])
    assert reopened.torn_lines == (0 if cut == 0 or data[cut - 1:cut] == b"\n" else 1)
    # resuming appends the rest; the file is again exactly the uninterrupted one
    reopened.append([(i, c) for i, c in CAPTIONS.items() if i not in reopened])
    assert CaptionCache(path, "cap-v1").captions == CAPTIONS
    assert path.read_bytes() == data


@pytest.mark.parametrize("text", ["", "   ", "\n\t", None, 7])
def test_empty_or_non_string_texts_are_refused_with_the_ids(text):
    with pytest.raises(DataError) as caught:
        Triplet("ref-1", (text,), "tgt-2")
    assert "ref-1" in str(caught.value) and "Fix:" in str(caught.value)
