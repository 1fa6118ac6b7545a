"""The serve app through Starlette's TestClient (no browser): search by gallery id, upload and path equal a
hand-computed exact top-k; refusals (non-image, oversized, wrong type, paths outside the root, unknown ids)
are clear 4xx errors and the server keeps answering."""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("starlette", reason='the web page is an optional extra: pip install "cir-plugins[serve]"')
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx (in the serve extra)")

from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from cir_plugins.data.cirr import load_cirr  # noqa: E402
from cir_plugins.data.fixtures import build_cirr_tree  # noqa: E402
from cir_plugins.negatives.bank import NegativeBank  # noqa: E402
from cir_plugins.serve import GallerySearcher, create_app  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import make_model  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = build_cirr_tree(tmp_path_factory.mktemp("serve") / "cirr", n_images=14)
    split = load_cirr(root, "val", size=4)  # the toy model reads (3, 4, 4) images
    model = make_model(dim=16, seed=3).eval()
    bank = NegativeBank.build(model, split.gallery_ids, split.images, dedup=False, show_progress=False)
    return root, split, model, bank


@pytest.fixture()
def client(world):
    _, split, model, bank = world
    searcher = GallerySearcher(model, bank, split.images)
    return _client(create_app(searcher, max_upload_bytes=20_000))


def _client(app):
    return TestClient(app, base_url="http://127.0.0.1:8000")  # an allowed Host (the default "testserver" is not)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _exact(model, bank, pixels, text, k, exclude_row=None):
    """Reference ranking: normalise(compose(encode_reference(image), text)) against every bank row."""
    with torch.no_grad():
        query = F.normalize(model.compose_query(model.encode_reference(pixels[None]), [text]), dim=-1)[0]
        scores = bank.embeddings.float() @ query  # (N,)
    if exclude_row is not None:
        scores[exclude_row] = float("-inf")
    order = sorted(range(len(scores)), key=lambda r: (-float(scores[r]), r))[:k]
    return [bank.ids[r] for r in order], [float(scores[r]) for r in order]


def test_search_by_gallery_id_equals_exact(world, client):
    _, split, model, bank = world
    reference = split.gallery_ids[2]
    answer = client.post("/api/search", json={"text": "make it red", "image_id": reference, "k": 5})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    ids, scores = _exact(model, bank, split.images[reference], "make it red", 5, bank.row_of(reference))
    assert [r["id"] for r in data["results"]] == ids and reference not in ids
    assert [r["score"] for r in data["results"]] == pytest.approx(scores, abs=1e-5)
    assert data["index"] == "exact" and data["results"][0]["url"] == f"/image/{ids[0]}"
    image = client.get(data["results"][0]["url"])
    assert image.status_code == 200 and image.content == split.images.path_of(ids[0]).read_bytes()


def test_upload_and_reference_path_equal_exact(world, client):
    root, split, model, bank = world
    reference = split.gallery_ids[4]
    path = split.images.path_of(reference)
    answer = client.post("/api/search", json={"text": "two dogs", "k": 4, "image": _b64(path.read_bytes())})
    assert answer.status_code == 200, answer.text
    ids, scores = _exact(model, bank, split.images[reference], "two dogs", 4)  # an upload excludes nothing
    assert [r["id"] for r in answer.json()["results"]] == ids
    assert [r["score"] for r in answer.json()["results"]] == pytest.approx(scores, abs=1e-5)
    relative = os.path.relpath(path, split.images.root)
    by_path = client.post("/api/search", json={"text": "two dogs", "reference_path": relative, "k": 4})
    assert by_path.status_code == 200 and [r["id"] for r in by_path.json()["results"]] == ids


def test_refusals_are_clear_and_the_server_keeps_serving(world, client, tmp_path):
    root, split, _, _ = world
    ok = {"text": "zoom out", "image_id": split.gallery_ids[0], "k": 3}

    def refused(response, status, words):
        assert response.status_code == status, response.text
        message = response.json()["error"]
        assert words in message, message
        assert client.post("/api/search", json=ok).status_code == 200  # still serving

    refused(client.post("/api/search", json={"text": "a", "k": 3, "image": _b64(b"hello")}), 415,
            "not a readable image (accepted: PNG, JPEG, WEBP, GIF, BMP)")
    refused(client.post("/api/search", json={"text": "a", "k": 3, "image": _b64(b"<html>not an image</html>")}), 415,
            "not a readable image")
    big = io.BytesIO()
    Image.effect_noise((200, 200), 60).convert("RGB").save(big, "PNG")  # ~100 kB of noise > the 20 kB limit
    refused(client.post("/api/search", json={"text": "a", "k": 3, "image": _b64(big.getvalue())}), 413,
            "larger than the upload limit")
    refused(client.post("/api/search", json={"text": "a", "k": 3, "image": "not base64!"}), 400, "not base64")
    refused(client.post("/api/search", json={"text": "a", "reference_path": "../../../../etc/passwd"}), 403, "..")
    refused(client.post("/api/search", json={"text": "a", "reference_path": "/etc/passwd"}), 403, "absolute")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    link = Path(split.images.root) / "link_out.png"
    link.symlink_to(outside)
    try:
        refused(client.post("/api/search", json={"text": "a", "reference_path": "link_out.png"}), 403, "outside")
    finally:
        link.unlink()
    refused(client.post("/api/search", json={"text": "a", "reference_path": "nothing/here.png"}), 404, "is missing")
    refused(
        client.post("/api/search", json={"text": "a", "image_id": "../cirr/captions/cap.rc2.val"}),
        404,
        "no gallery image",
    )
    refused(client.post("/api/search", json={"text": "  ", "image_id": split.gallery_ids[0]}), 400, "text")
    refused(
        client.post("/api/search", json={"text": "a", "image_id": split.gallery_ids[0], "k": 0}), 400, "out of range"
    )
    refused(client.post("/api/search", json={"text": "a"}), 400, "exactly one reference")
    refused(client.post("/api/search", content=b"text=a", headers={"content-type": "text/plain"}), 415, "as JSON")
    refused(client.post("/api/search", data={"text": "a", "image_id": split.gallery_ids[0]}), 415, "as JSON")
    refused(client.post("/api/search", json={"text": "a", "image_id": split.gallery_ids[0], "file": "x"}), 400,
            "unknown fields")
    refused(
        client.post("/api/search", content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"
    )
    for url in ("/image/..%2F..%2Fetc%2Fpasswd", "/image/../../etc/passwd", "/image/cirr/captions/cap.rc2.val.json"):
        response = client.get(url)
        assert response.status_code == 404, (url, response.status_code)
        assert "root:" not in response.text


def test_page_info_gallery(world, client):
    _, split, _, bank = world
    page = client.get("/")
    assert page.status_code == 200 and 'id="search"' in page.text and '<script src="/static/page.js">' in page.text
    script = client.get("/static/page.js")
    assert script.status_code == 200 and "/api/search" in script.text
    assert script.headers["content-type"].startswith("text/javascript")
    info = client.get("/api/info").json()
    assert (
        info["gallery"] == len(split.gallery_ids) and info["rows"] == len(bank) and info["max_upload_bytes"] == 20_000
    )
    listed = client.get("/api/gallery", params={"q": split.gallery_ids[3], "limit": 5}).json()
    assert split.gallery_ids[3] in listed["ids"] and listed["total"] >= 1
    assert client.get("/api/gallery", params={"limit": "x"}).status_code == 400


def test_faiss_index_gives_the_exact_answer(world):
    pytest.importorskip("faiss", reason='FAISS is an optional extra: pip install "cir-plugins[faiss]"')
    from cir_plugins.negatives.faiss_index import build_faiss_index

    _, split, model, bank = world
    exact = _client(create_app(GallerySearcher(model, bank, split.images)))
    flat = _client(create_app(GallerySearcher(model, bank, split.images, index=build_faiss_index(bank, "flat"))))
    body = {"text": "add a tree", "image_id": split.gallery_ids[5], "k": 6}
    a, b = exact.post("/api/search", json=body).json(), flat.post("/api/search", json=body).json()
    assert [r["id"] for r in a["results"]] == [r["id"] for r in b["results"]]
    assert [r["score"] for r in a["results"]] == pytest.approx([r["score"] for r in b["results"]], abs=1e-5)
    assert b["index"].startswith("FaissIndex(kind='flat'")


def test_searcher_refuses_a_foreign_index_and_store(world, tmp_path):
    pytest.importorskip("faiss", reason='FAISS is an optional extra: pip install "cir-plugins[faiss]"')
    from cir_plugins.errors import BankMismatchError, DataError
    from cir_plugins.negatives.faiss_index import build_faiss_index

    root, split, model, bank = world
    other = NegativeBank(bank.embeddings.clone(), bank.ids, [bank.row_of(i) for i in bank.ids], similarity="dot",
                         fingerprint="another model")
    with pytest.raises(BankMismatchError, match="not exported from this bank"):
        GallerySearcher(model, bank, split.images, index=build_faiss_index(other, "flat"))
    with pytest.raises(DataError, match="no bank id"):
        GallerySearcher(model, bank, load_cirr(root, "train", size=4).images)


def test_command_binds_localhost_and_serves_the_bank(world, tmp_path, monkeypatch, capsys):
    import uvicorn

    from cir_plugins.cli import main

    root, split, model, bank = world
    bank_path = tmp_path / "bank.safetensors"
    bank.save(bank_path)
    factory = tmp_path / "factory.py"
    factory.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from _toy import make_model\n\n\ndef build():\n    return make_model(dim=16, seed=3)\n"
    )
    calls = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server: calls.append((server.config.app, {
        "host": server.config.host, "port": server.config.port})))
    common = ["serve", "--model", f"{factory}:build", "--dataset", "cirr", "--root", str(root), "--split", "val",
              "--image-size", "4", "--bank", str(bank_path)]
    assert main(common) == 0
    app, options = calls[-1]
    assert options["host"] == "127.0.0.1" and options["port"] == 8000  # the local machine only, by default
    body = {"text": "make it red", "image_id": split.gallery_ids[2], "k": 5}
    exact = _client(app).post("/api/search", json=body).json()
    ids, _ = _exact(
        model, bank, split.images[split.gallery_ids[2]], "make it red", 5, bank.row_of(split.gallery_ids[2])
    )
    assert [r["id"] for r in exact["results"]] == ids
    # a bank made by other weights is refused before serving
    other = tmp_path / "other.py"
    other.write_text(factory.read_text().replace("seed=3", "seed=4"))
    assert main([*common[:2], f"{other}:build", *common[3:]]) == 2
    assert "bank" in capsys.readouterr().err.lower()
    pytest.importorskip("faiss", reason='FAISS is an optional extra: pip install "cir-plugins[faiss]"')
    index_path = tmp_path / "bank.faiss"
    assert main(common + ["--faiss-export", "flat", "--faiss", str(index_path), "--port", "8123"]) == 0
    assert index_path.is_file() and calls[-1][1]["port"] == 8123
    assert main(common + ["--faiss", str(index_path)]) == 0
    by_index = _client(calls[-1][0]).post("/api/search", json=body).json()
    assert by_index["index"].startswith("FaissIndex") and [r["id"] for r in by_index["results"]] == ids


def test_multi_vector_bank_is_searched_exactly(world):
    _, split, _, _ = world
    model = make_model(dim=8, tokens_per_image=3, seed=1).eval()
    bank = NegativeBank.build(model, split.gallery_ids, split.images, dedup=False, show_progress=False)
    assert bank.similarity == "max_token" and bank.embeddings.dim() == 3
    reference = split.gallery_ids[1]
    found = GallerySearcher(model, bank, split.images).search("add a tree", image_id=reference, k=4)
    with torch.no_grad():
        query = F.normalize(model.compose_query(model.encode_reference(split.images[reference][None]), ["add a tree"]),
                            dim=-1)[0]
        scores = (bank.embeddings.float() @ query).amax(dim=1)  # (N, T) -> (N,): max over the target's tokens
    scores[bank.row_of(reference)] = float("-inf")
    order = sorted(range(len(scores)), key=lambda r: (-float(scores[r]), r))[:4]
    assert [r["id"] for r in found["results"]] == [bank.ids[r] for r in order]
    assert [r["score"] for r in found["results"]] == pytest.approx([float(scores[r]) for r in order], abs=1e-5)


def test_upload_over_the_pixel_limit_is_refused_before_decoding(world):
    _, split, model, bank = world
    client = _client(create_app(GallerySearcher(model, bank, split.images, max_pixels=100)))
    data = split.images.path_of(split.gallery_ids[0]).read_bytes()  # a 28x24 PNG: 672 pixels
    answer = client.post("/api/search", json={"text": "a", "k": 2, "image": _b64(data)})
    assert answer.status_code == 413 and "more pixels than allowed" in answer.json()["error"]
    assert client.post("/api/search", json={"text": "a", "image_id": split.gallery_ids[0], "k": 2}).status_code == 200
