"""Load test of ``cir-plugins serve`` on loopback: 200 searches, 20 in parallel, 40 of them a decompression bomb,
while ``/api/info`` is polled and one slow client dribbles its headers.

The server is the command itself, in its own process (``python -m cir_plugins.cli serve``), over the quick
synthetic world's test gallery (real scenes, 36 px) with the CLIP4Cir example on a tiny CLIP (random weights:
the model's cost is the tiny one's; what is measured here is the server around it). The bomb is a 1-bit
8000 x 8000 PNG of about 8 kB (64 Mpx once decoded, just under the gallery's 64 Mpx limit), sent as the upload
of a JSON search; the other 160 searches are 80 by gallery id and 80 uploads of a gallery PNG, in a seeded order.

A fresh server per run: the defaults (uploads limited to 24 Mpx, so the bomb is refused from its header); with
``--gallery-limit`` also a run with ``serve --max-upload-pixels 64000000`` (the gallery's limit: every bomb is
decoded, in the bounded worker pool; a minute or more on a shared 2-core CPU). Each client honours the busy
answer (503, Retry-After: 1) by waiting and sending again. Reported per run:
final answers by status, the 503s met on the way, latency p50 / p99 / max per kind of request (first send to final
answer) and of the /api/info polls (one every 0.1 s), the server's peak RSS (VmHWM) and its RSS before the load,
and when the slow client (one header byte a second) was cut off.

    python benchmarks/serve_load.py [--gallery-limit] [--out benchmarks/serve_load.json]
                                    [--requests 200 --parallel 20 --bombs 40]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"


def prepare(work: Path) -> dict:
    """The quick world, a tiny CLIP (random weights), a factory file for --model and a bank over the test gallery."""
    sys.path[:0] = [str(EXAMPLES), str(EXAMPLES / "clip4cir")]
    import _tiny_clip
    from model import CLIP4Cir

    from cir_plugins.data.cirr import load_cirr
    from cir_plugins.data.synthetic import load_scenes, make_world
    from cir_plugins.negatives.bank import NegativeBank

    root = make_world(work / "world", seed=0, size="quick")
    scenes = load_scenes(root)
    test = load_cirr(root, "test", transform="targetpad", size=36)
    clip = _tiny_clip.save_tiny_clip(work / "clip", _tiny_clip.words_of(
        [s["caption"] for s in scenes.values()] + [t.texts[0] for t in test.triplets]), seed=0, image_size=36)
    factory = work / "factory.py"
    factory.write_text(f"import sys\nsys.path[:0] = [{str(EXAMPLES)!r}, {str(EXAMPLES / 'clip4cir')!r}]\n"
                       "from model import CLIP4Cir\n\n\ndef build():\n"
                       f"    return CLIP4Cir.from_pretrained({str(clip)!r})\n")
    bank = NegativeBank.build(CLIP4Cir.from_pretrained(str(clip)).eval(), test.gallery_ids, test.images,
                              show_progress=False)
    bank.save(work / "bank.safetensors")
    return {"root": root, "factory": factory, "bank": work / "bank.safetensors", "gallery": list(test.gallery_ids),
            "texts": [t.texts[0] for t in test.triplets], "png": test.images.path_of(test.gallery_ids[0]).read_bytes()}


def bomb_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (8000, 8000)).save(out, "PNG")
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kb(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def post(url: str, body: dict, timeout: float = 120.0) -> tuple[int, float]:
    """(status, the Retry-After it asked for, else 0); status 0: no answer (refused, reset, timed out)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, 0.0
    except urllib.error.HTTPError as error:
        error.read()
        return error.code, float(error.headers.get("retry-after") or 0)
    except OSError:
        return 0, 0.0


def slow_client(port: int, every: float, give_up: float) -> dict:
    """One header byte every ``every`` s; seconds until the server closed the connection (None: never)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=give_up) as sock:
        sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.settimeout(every)
        while time.monotonic() - start < give_up:
            try:
                sock.sendall(b"X")
                if sock.recv(1024) == b"":
                    return {"closed_after_s": round(time.monotonic() - start, 2), "byte_every_s": every}
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                return {"closed_after_s": round(time.monotonic() - start, 2), "byte_every_s": every}
    return {"closed_after_s": None, "byte_every_s": every}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q):  # nearest-rank percentile
        return round(ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))], 3)

    return {"n": len(ordered), "p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 3)}


def run(prepared: dict, args, name: str, extra_flags: list[str]) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "cir_plugins.cli", "serve", "--model", f"{prepared['factory']}:build",
               "--bank", str(prepared["bank"]), "--dataset", "cirr", "--root", str(prepared["root"]), "--split", "test",
               "--transform", "targetpad", "--image-size", "36", "--port", str(port), *extra_flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                info = json.loads(urllib.request.urlopen(base + "/api/info", timeout=2).read())
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}") from None
                time.sleep(0.2)
        idle = rss_kb(server.pid)
        rng = random.Random(0)
        bomb = base64.b64encode(prepared["bomb"]).decode()
        small = base64.b64encode(prepared["png"]).decode()
        n_id = (args.requests - args.bombs) // 2
        kinds = ["bomb"] * args.bombs + ["gallery id"] * n_id + ["upload"] * (args.requests - args.bombs - n_id)
        rng.shuffle(kinds)
        bodies = []
        for kind in kinds:
            body = {"text": rng.choice(prepared["texts"]), "k": 10}
            if kind == "gallery id":
                body["image_id"] = rng.choice(prepared["gallery"])
            else:
                body["image"] = bomb if kind == "bomb" else small
            bodies.append((kind, body))
        polls, stop = [], threading.Event()

        def poll():
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    urllib.request.urlopen(base + "/api/info", timeout=60).read()
                    polls.append(time.perf_counter() - t0)
                except OSError:
                    polls.append(float("inf"))
                stop.wait(0.1)

        def one(item):  # a client that honours 503 + Retry-After (the busy answer) and tries again
            kind, body = item
            t0, busy = time.perf_counter(), 0
            while True:
                status, retry_after = post(base + "/api/search", body)
                if status != 503 or busy >= 100:
                    return kind, status, time.perf_counter() - t0, busy
                busy += 1
                time.sleep(retry_after)

        slow = {}
        slow_thread = threading.Thread(target=lambda: slow.update(slow_client(port, 1.0, 60.0)), daemon=True)
        poller = threading.Thread(target=poll, daemon=True)
        start = time.perf_counter()
        slow_thread.start()
        poller.start()
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            answers = list(pool.map(one, bodies))
        wall = time.perf_counter() - start
        stop.set()
        poller.join(60)
        slow_thread.join(70)
        peak = rss_kb(server.pid)
        statuses: dict[str, dict[str, int]] = {}
        latency: dict[str, list[float]] = {}
        retried: dict[str, int] = {}
        for kind, status, seconds, busy in answers:
            statuses.setdefault(kind, {}).setdefault(str(status), 0)
            statuses[kind][str(status)] += 1
            latency.setdefault(kind, []).append(seconds)
            retried[kind] = retried.get(kind, 0) + busy
        all_latency = [a[2] for a in answers]
        shown = ("gallery", "rows", "workers", "queue", "max_upload_pixels")
        return {"run": name, "flags": extra_flags, "server": {k: info[k] for k in shown},
                "wall_s": round(wall, 2), "statuses": statuses, "busy_503_then_retried": retried,
                "latency_s": {"all": percentiles(all_latency), **{k: percentiles(v) for k, v in latency.items()}},
                "info_poll_s": percentiles(polls), "rss_mb": {"before_load": round(idle["VmRSS"] / 1024),
                                                              "peak": round(peak["VmHWM"] / 1024)},
                "slow_client": slow}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--bombs", type=int, default=40)
    parser.add_argument("--gallery-limit", action="store_true",
                        help="also run with uploads allowed up to the gallery's 64 Mpx (every bomb decoded)")
    parser.add_argument("--out", default="benchmarks/serve_load.json")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cir_serve_load_") as work:
        prepared = prepare(Path(work))
        prepared["bomb"] = bomb_png()
        prepare_s = time.perf_counter() - started
        runs = [run(prepared, args, "defaults (uploads up to 24 Mpx)", [])]
        if args.gallery_limit:
            runs.append(run(prepared, args, "uploads up to 64 Mpx (the gallery's limit)",
                            ["--max-upload-pixels", "64000000"]))
    print(f"gallery {runs[0]['server']['gallery']} images; bomb PNG {len(prepared['bomb'])} bytes (8000x8000, 1 bit); "
          f"{args.requests} searches, {args.parallel} in parallel, {args.bombs} bombs; prepared in {prepare_s:.0f} s")
    for r in runs:
        print(f"\n{r['run']}: wall {r['wall_s']} s, workers {r['server']['workers']}, queue {r['server']['queue']}")
        print(f"  {'requests':12} {'n':>4} {'p50 s':>7} {'p99 s':>7} {'max s':>7}  final statuses (503s retried)")
        for kind in ("all", "gallery id", "upload", "bomb"):
            p = r["latency_s"][kind]
            statuses = "" if kind == "all" else ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"][kind].items()))
            busy = sum(r["busy_503_then_retried"].values()) if kind == "all" else r["busy_503_then_retried"][kind]
            print(f"  {kind:12} {p['n']:4d} {p['p50']:7.3f} {p['p99']:7.3f} {p['max']:7.3f}  {statuses} ({busy})")
        p = r["info_poll_s"]
        print(f"  {'/api/info':12} {p['n']:4d} {p['p50']:7.3f} {p['p99']:7.3f} {p['max']:7.3f}")
        print(f"  RSS before {r['rss_mb']['before_load']} MB, peak {r['rss_mb']['peak']} MB; slow client (a header "
              f"byte a second) cut off after {r['slow_client']['closed_after_s']} s")
    record = _common.record_header("serve_load")
    record.update(machine=f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
                          f"{os.getloadavg()[0]:.1f}", bomb_bytes=len(prepared["bomb"]), requests=args.requests,
                  parallel=args.parallel, bombs=args.bombs, prepare_s=round(prepare_s, 1), runs=runs)
    _common.write_json(args.out, record)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
