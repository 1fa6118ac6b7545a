import io

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from cir_plugins.data.dedup import find_duplicates, near_duplicate_groups, pixel_hash
from cir_plugins.errors import ConfigError, DataError


def _png_roundtrip(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    data = buffer.getvalue()
    return data, Image.open(io.BytesIO(data))


def test_same_pixels_different_bytes_are_one_group():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), "RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "saved elsewhere")
    bytes_a, a = _png_roundtrip(base, compress_level=0)
    bytes_b, b = _png_roundtrip(base, compress_level=9, pnginfo=info)
    assert bytes_a != bytes_b
    rgba = base.convert("RGBA")  # opaque alpha: same RGB pixels
    other = base.copy()
    other.putpixel((0, 0), (1, 2, 3) if base.getpixel((0, 0)) != (1, 2, 3) else (4, 5, 6))
    transposed = base.transpose(Image.Transpose.TRANSPOSE)  # same bytes count, other size
    store = {"x1": a, "y": other, "x2": b, "x3": rgba, "t": transposed}
    groups = find_duplicates(["y", "x1", "x2", "t", "x3"], store, show_progress=False)
    assert groups == {"y": "y", "x1": "x1", "x2": "x1", "t": "t", "x3": "x1"}
    assert pixel_hash(a) == pixel_hash(b) != pixel_hash(other)


def test_loader_forms_and_group_id_is_first_in_input_order():
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    blue = Image.new("RGB", (4, 4), (0, 0, 255))
    table = {"b2": blue, "r1": red, "b1": blue.copy(), "r2": red.copy()}

    class Store:
        def load_pil(self, image_id):
            return table[image_id]

    order = ["r2", "b1", "r1", "b2"]
    expected = {"r2": "r2", "b1": "b1", "r1": "r2", "b2": "b1"}
    assert find_duplicates(order, Store(), show_progress=False) == expected
    assert find_duplicates(order, table.__getitem__, show_progress=False) == expected
    assert find_duplicates(order, table, show_progress=False) == expected


def _components_reference(emb, threshold, start):
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    full = (x @ x.T >= threshold).numpy()
    n = len(x)
    adjacency = [set(np.nonzero(full[i])[0].tolist()) | {start[i]} for i in range(n)]
    for i in range(n):
        adjacency[start[i]].add(i)
    label = [-1] * n
    for i in range(n):
        if label[i] >= 0:
            continue
        stack, members = [i], []
        label[i] = i
        while stack:
            u = stack.pop()
            members.append(u)
            for v in adjacency[u]:
                if label[v] < 0:
                    label[v] = i
                    stack.append(v)
    return [min(j for j in range(n) if label[j] == label[i]) for i in range(n)]


@pytest.mark.parametrize("chunk_size", [1, 5, 100])
def test_near_duplicates_match_connected_components(chunk_size):
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 5, generator=gen)
    emb = centres[torch.randint(0, 6, (47,), generator=gen)] + 0.05 * torch.randn(47, 5, generator=gen)
    start = list(range(47))
    start[40] = 2  # an exact-duplicate link given up front
    got = near_duplicate_groups(emb, 0.97, start_groups=start, chunk_size=chunk_size)
    assert got == _components_reference(emb, 0.97, start)
    assert len(set(got)) < 47


def test_find_duplicates_with_near_threshold():
    images = {f"i{k}": Image.new("RGB", (2, 2), (k, 0, 0)) for k in range(5)}
    emb = torch.tensor([[1.0, 0], [0, 1.0], [0.999, 0.01], [0, -1.0], [0.01, 0.999]])
    groups = find_duplicates(list(images), images, embeddings=emb, near_duplicate_threshold=0.99,
                             show_progress=False)
    assert groups == {"i0": "i0", "i1": "i1", "i2": "i0", "i3": "i3", "i4": "i1"}


def test_errors():
    images = {"a": Image.new("RGB", (2, 2))}
    with pytest.raises(DataError):
        find_duplicates(["a", "a"], images, show_progress=False)
    with pytest.raises(DataError):
        find_duplicates(["a", "zzz"], images, show_progress=False)
    with pytest.raises(ConfigError):
        find_duplicates(["a"], images, near_duplicate_threshold=0.9, show_progress=False)
    with pytest.raises(ConfigError):
        near_duplicate_groups(torch.randn(3, 2), 1.5)
    with pytest.raises(ConfigError):
        find_duplicates(["a"], 42, show_progress=False)
