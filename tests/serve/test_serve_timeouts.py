"""The served app under uvicorn (serve.server_config, on a free port of 127.0.0.1, in a thread): a client that
dribbles its headers or its body is cut off at the request deadline while others are answered; the command's
serving flags are checked before anything is loaded."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason='the web page is an optional extra: pip install "cir-plugins[serve]"')
uvicorn = pytest.importorskip("uvicorn", reason='serving is an optional extra: pip install "cir-plugins[serve]"')

from cir_plugins.data.cirr import load_cirr  # noqa: E402
from cir_plugins.data.fixtures import build_cirr_tree  # noqa: E402
from cir_plugins.negatives.bank import NegativeBank  # noqa: E402
from cir_plugins.serve import GallerySearcher, create_app, server_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import make_model  # noqa: E402

DEADLINE = 1.0  # seconds; the tests wait up to 30x longer for the cut before calling it a hang


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = build_cirr_tree(tmp_path_factory.mktemp("timeouts") / "cirr", n_images=8)
    split = load_cirr(root, "val", size=4)
    model = make_model(dim=16, seed=3).eval()
    bank = NegativeBank.build(model, split.gallery_ids, split.images, dedup=False, show_progress=False)
    app = create_app(GallerySearcher(model, bank, split.images), default_k=3)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(server_config(app, port=port, log_level="warning", request_timeout=DEADLINE))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port, split
    uv.should_exit = True
    thread.join(10)


def _dribble(port: int, head: bytes, drip: bytes, *, every: float = 0.2, give_up: float = 30.0) -> tuple[bool, bytes]:
    """Send ``head``, then ``drip`` a byte at a time; (closed by the server, what it answered)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=give_up) as sock:
        sock.sendall(head)
        sock.settimeout(every)
        stop = time.monotonic() + give_up
        for i in range(10**6):
            if time.monotonic() > stop:
                return False, answer
            try:
                sock.sendall(drip[i % len(drip):i % len(drip) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return True, answer
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True, answer
            if not chunk:
                return True, answer
            answer += chunk
    return False, answer


def test_dribbled_headers_are_cut_off_at_the_deadline(server):
    port, _ = server
    closed, _ = _dribble(port, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: aaaaaaaaaaaaaaaaaaaa")
    assert closed, "a client dribbling its headers kept its connection"


def test_a_dribbled_body_is_cut_off_while_other_clients_are_answered(server):
    port, split = server
    body = json.dumps({"text": "make it red", "image_id": split.gallery_ids[0], "k": 3}).encode()
    head = (b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body) + 1000).encode() + b"\r\n\r\n")
    outcome = {}
    slow = threading.Thread(target=lambda: outcome.update(result=_dribble(port, head, b" ")), daemon=True)
    slow.start()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/search", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:  # answered meanwhile
        assert response.status == 200 and len(json.loads(response.read())["results"]) == 3
    slow.join(40)
    assert outcome["result"][0], "a client dribbling its body kept its connection"
    assert b"200 OK" not in outcome["result"][1]


def test_a_keep_alive_connection_serves_several_prompt_requests(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while b"}" not in answer:
                chunk = sock.recv(65536)
                assert chunk, "the server closed a prompt keep-alive connection"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(DEADLINE * 0.6)  # idle less than the deadline between requests, 3 times: more than it in all


@pytest.mark.parametrize("flags,words", [
    (["--port", "99999"], "--port must be a TCP port"),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be a positive number"),
    (["--max-upload-mb", "-1"], "--max-upload-mb must be a positive number"),
    (["--request-timeout", "inf"], "--request-timeout"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--nprobe", "8"], "--nprobe applies to a FAISS index"),
])
def test_serve_flags_are_checked_before_anything_is_loaded(flags, words, capsys, tmp_path):
    from cir_plugins.cli import main

    code = main(["serve", "--model", "nowhere.py:build", "--dataset", "cirr", "--root", str(tmp_path),
                 "--bank", str(tmp_path / "bank.safetensors"), *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
