"""The search page under attack (through Starlette's TestClient): files leave the server only through the store's
checked open with the content type of their decoded format; nosniff and a strict CSP on every answer; a FIFO or a
directory in place of an image is a quick 4xx; decoding and the model run off the event loop in a bounded pool that
answers 503 when full; uploads reach only the allowed decoders within their own pixel budget; a foreign page or a
rebound host name cannot drive it; every bad request is a JSON 4xx without an absolute path."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason='the web page is an optional extra: pip install "cir-plugins[serve]"')
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx (in the serve extra)")

from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from cir_plugins.data.images import ImageStore  # noqa: E402
from cir_plugins.negatives.bank import NegativeBank  # noqa: E402
from cir_plugins.serve import GallerySearcher, create_app  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import make_model  # noqa: E402

BASE = "http://127.0.0.1:8000"
IDS = [f"img{i}" for i in range(8)]


def _png_bytes(size=(9, 7), seed=0, mode="RGB") -> bytes:
    out = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_attacks") / "gallery"
    root.mkdir()
    paths = {}
    for i, image_id in enumerate(IDS):
        (root / f"{image_id}.png").write_bytes(_png_bytes(seed=i))
        paths[image_id] = f"{image_id}.png"
    # a split entry named like a web page that holds a valid PNG followed by a script: it decodes, so it is served
    (root / "evil.html").write_bytes(_png_bytes(seed=99) + b"<script>document.title='owned'</script>")
    paths["evil"] = "evil.html"
    store = ImageStore(root, paths, "clip", size=4)
    model = make_model(dim=16, seed=3).eval()
    bank = NegativeBank.build(model, list(paths), store, dedup=False, show_progress=False)
    return root, store, model, bank


def _app(world, **kwargs):
    _, store, model, bank = world
    searcher_kwargs = {k: kwargs.pop(k) for k in ("max_pixels",) if k in kwargs}
    return create_app(GallerySearcher(model, bank, store, **searcher_kwargs), **kwargs)


@pytest.fixture()
def client(world):
    return TestClient(_app(world), base_url=BASE)


def _json_error(response, status, words=""):
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json", response.headers["content-type"]
    message = response.json()["error"]
    assert words in message, message
    return message


# --- finding 1: a symlink swapped in after start -------------------------------------------------------------
def test_an_image_swapped_for_a_symlink_after_start_is_not_served(world, client, tmp_path):
    root = world[0]
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png_bytes(seed=123))
    original = (root / "img1.png").read_bytes()
    assert client.get("/image/img1").content == original
    (root / "img1.png").unlink()
    (root / "img1.png").symlink_to(secret)
    try:
        response = client.get("/image/img1")
        _json_error(response, 403, "outside the dataset root")
        assert secret.read_bytes() not in response.content and str(secret.parent) not in response.text
        _json_error(client.post("/api/search", json={"text": "a", "image_id": "img1"}), 403)
    finally:
        (root / "img1.png").unlink()
        (root / "img1.png").write_bytes(original)


# --- finding 2: stored XSS through a file's extension ----------------------------------------------------------
def test_a_file_is_served_with_the_type_of_its_bytes_and_every_answer_forbids_sniffing_and_foreign_scripts(client):
    response = client.get("/image/evil")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    for url in ("/", "/api/info", "/image/evil", "/image/nothing", "/no/such/route"):
        headers = client.get(url).headers
        assert headers["x-content-type-options"] == "nosniff", url
        policy = headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
    page = client.get("/").text
    assert "<script>" not in page and "style=" not in page  # nothing inline: the CSP allows only /static files
    titled = TestClient(create_app(client.app.state.searcher, title="<script>alert(1)</script>"), base_url=BASE)
    assert "<script>alert(1)" not in titled.get("/").text and "&lt;script&gt;" in titled.get("/").text


# --- finding 3: a FIFO or a directory in place of an image -------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_or_directory_in_place_of_an_image_is_a_quick_4xx_and_the_server_keeps_answering(world, client, within):
    root = world[0]
    original = (root / "img2.png").read_bytes()
    (root / "img2.png").unlink()
    os.mkfifo(root / "img2.png")
    try:
        for call in (lambda: client.post("/api/search", json={"text": "a", "image_id": "img2"}),
                     lambda: client.get("/image/img2")):
            finished, response = within(30, call)
            assert finished, "a FIFO hung the request"
            _json_error(response, 415, "not a regular file (it is a FIFO)")
        (root / "img2.png").unlink()
        (root / "img2.png").mkdir()
        _json_error(client.post("/api/search", json={"text": "a", "image_id": "img2"}), 415, "it is a directory")
        assert client.get("/api/info").status_code == 200
    finally:
        target = root / "img2.png"
        target.rmdir() if target.is_dir() else target.unlink()
        target.write_bytes(original)


# --- finding 4: a FAISS index of another bank ---------------------------------------------------------------------
def test_an_index_of_the_same_images_in_another_order_is_refused_by_the_searcher(world):
    pytest.importorskip("faiss", reason='FAISS is an optional extra: pip install "cir-plugins[faiss]"')
    from cir_plugins.errors import BankMismatchError
    from cir_plugins.negatives.faiss_index import build_faiss_index

    _, store, model, bank = world
    order = list(reversed(range(len(bank))))
    reversed_bank = NegativeBank(bank.embeddings[order], [bank.ids[r] for r in order], list(range(len(bank))),
                                 similarity="dot", fingerprint=bank.fingerprint)
    with pytest.raises(BankMismatchError, match="not exported from this bank"):
        GallerySearcher(model, bank, store, index=build_faiss_index(reversed_bank, "flat"))


# --- finding 5: denial of service -------------------------------------------------------------------------------
def _blocking_search(searcher, started, release):
    plain = searcher.search

    def slow(*args, **kwargs):  # a decode or model call that takes as long as the test wants
        started.set()
        release.wait(60)
        return plain(*args, **kwargs)

    searcher.search = slow


def test_a_slow_search_runs_off_the_event_loop_and_a_full_pool_answers_503(world, within):
    app = _app(world, workers=1, queue=0)
    started, release = threading.Event(), threading.Event()
    _blocking_search(app.state.searcher, started, release)
    body = {"text": "a", "image_id": "img0", "k": 3}
    with TestClient(app, base_url=BASE) as client:  # one event loop for every request, as under uvicorn
        slow = threading.Thread(target=lambda: client.post("/api/search", json=body), daemon=True)
        slow.start()
        assert started.wait(30)
        try:
            finished, info = within(30, lambda: client.get("/api/info"))
            assert finished and info.status_code == 200 and info.json()["busy"] == 1  # the loop still answers
            finished, second = within(30, lambda: client.post("/api/search", json=body))
            assert finished
            _json_error(second, 503, "busy")
            assert second.headers["retry-after"] == "1"
        finally:
            release.set()
            slow.join(30)
        assert client.post("/api/search", json=body).status_code == 200  # a slot is free again


def test_uploads_have_their_own_lower_pixel_budget_checked_before_decoding(world):
    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, "PNG")  # a few kB of PNG, 25 Mpx once decoded
    assert len(bomb.getvalue()) < 10_000
    body = {"text": "a", "k": 2, "image": base64.b64encode(bomb.getvalue()).decode()}
    client = TestClient(_app(world), base_url=BASE)
    info = client.get("/api/info").json()
    assert info["max_upload_pixels"] == 24_000_000 < world[1].max_pixels  # below the gallery's own limit
    _json_error(client.post("/api/search", json=body), 413, "more pixels than allowed")
    roomy = TestClient(_app(world, max_pixels=30_000_000), base_url=BASE)
    assert roomy.post("/api/search", json=body).status_code == 200  # the option raises it


def test_a_rebound_host_name_or_a_foreign_page_is_refused(client):
    body = {"text": "a", "image_id": "img0", "k": 2}
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        _json_error(client.get("/api/info", headers={"host": host}), 400, "own host name")
        _json_error(client.post("/api/search", json=body, headers={"host": host}), 400, "own host name")
    for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example:8000"):
        _json_error(client.post("/api/search", json=body, headers={"origin": origin}), 403, "another site")
    assert client.post("/api/search", json=body, headers={"origin": BASE}).status_code == 200
    # what a foreign page can send without a CORS preflight (a form: urlencoded, multipart, text/plain) is refused
    _json_error(client.post("/api/search", data={"text": "a", "image_id": "img0"}), 415, "as JSON")
    _json_error(client.post("/api/search", content=json.dumps(body), headers={"content-type": "text/plain"}), 415)
    _json_error(client.post("/api/search", files={"image": ("a.png", _png_bytes(), "image/png")},
                            data={"text": "a"}), 415, "as JSON")
    allowed = TestClient(create_app(client.app.state.searcher, allowed_hosts=("gallery.lan",)), base_url=BASE)
    assert allowed.get("/api/info", headers={"host": "gallery.lan:8000"}).status_code == 200


# --- finding 6: JSON 4xx for every bad request, no absolute path ---------------------------------------------------
def test_every_bad_request_is_a_json_4xx_without_an_absolute_path(world, client):
    root = str(world[0])
    cases = [
        (client.post("/api/search", json={"text": "a", "reference_path": "img0.png\x00.txt"}), 403, "NUL"),
        (client.post("/api/search", content=b'{"text": "a", "image_id": "img0", "k": 1e400}',
                     headers={"content-type": "application/json"}), 400, "k must be an integer"),
        (client.post("/api/search", json={"text": "a", "image_id": "img0", "k": 2.0}), 400, "k must be an integer"),
        (client.post("/api/search", json={"text": "a", "image_id": "img0", "k": True}), 400, "k must be an integer"),
        (client.post("/api/search", json={"text": "a", "image_id": "img0", "k": 10**30}), 400, "out of range"),
        (client.post("/api/search", content=b"[" * 100_000, headers={"content-type": "application/json"}), 400,
         "not valid JSON"),
        (client.post("/api/search", content=b"--x\r\nContent-Disposition: form-data\r\n\r\n",
                     headers={"content-type": "multipart/form-data; boundary=x"}), 415, "as JSON"),
        (client.post("/api/search", json={"text": 5, "image_id": "img0"}), 400, "text"),
        (client.post("/api/search", json={"text": "a", "image_id": ["img0"]}), 400, "must be a string"),
        (client.post("/api/search", json={"text": "a" * 5000, "image_id": "img0"}), 400, "too long"),
        (client.post("/api/search", json={"text": "a", "reference_path": "missing/x.png"}), 404, "is missing"),
        (client.post("/api/search", json={"text": "a", "reference_path": "../outside.png"}), 403, "climbs out"),
        (client.get("/api/search"), 405, ""),
        (client.get("/no/such/route"), 404, ""),
        (client.get("/image/nothing"), 404, "no gallery image"),
    ]
    for response, status, words in cases:
        message = _json_error(response, status, words)
        assert root not in message and "/tmp" not in message, message


def test_a_model_failure_is_a_json_500_naming_no_object_or_path(world):
    app = _app(world)

    def broken(*args, **kwargs):
        raise RuntimeError(f"boom at {world[0]} in <object at 0x7f00>")

    app.state.searcher.search = broken
    message = _json_error(TestClient(app, base_url=BASE).post("/api/search", json={"text": "a", "image_id": "img0"}),
                          500, "failed inside the server")
    assert "boom" not in message and "0x7f" not in message


# --- finding 7: only the allowed decoders are reachable from the network --------------------------------------------
@pytest.mark.filterwarnings("ignore:IM image format is deprecated")
@pytest.mark.parametrize("kind", ["TIFF", "ICO", "PCX", "PPM", "IM", "TGA", "SGI"])
def test_an_upload_in_a_format_outside_the_allow_list_is_not_decoded(client, kind):
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(out, kind)
    body = {"text": "a", "k": 2, "image": base64.b64encode(out.getvalue()).decode()}
    _json_error(client.post("/api/search", json=body), 415, "accepted: PNG, JPEG, WEBP, GIF, BMP")


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_an_upload_in_an_allowed_format_searches(client, kind):
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(out, kind)
    body = {"text": "a", "k": 2, "image": base64.b64encode(out.getvalue()).decode()}
    response = client.post("/api/search", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2 and torch.isfinite(torch.tensor(response.json()["results"][0]["score"]))
