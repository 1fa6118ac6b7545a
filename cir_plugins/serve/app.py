"""The web page and JSON endpoints over a :class:`GallerySearcher` (Starlette, the ``serve`` extra; served by uvicorn).

Routes: ``GET /`` (the page; its script and style under ``/static/``), ``GET /api/info``, ``GET /api/gallery``,
``GET /image/{id}`` and ``POST /api/search`` (JSON only); the README's serve section has the API table, the error
statuses (a JSON ``{"error": message}`` without any absolute path) and what the server guards against: a bounded
worker pool (503 beyond it), upload size, format and pixel limits, the Host allow-list and Origin check, nosniff
and a Content-Security-Policy, a deadline per request. Each guard is a setting of :func:`create_app` or
:func:`~cir_plugins.serve.serve`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import html
import json
import logging
import re
import threading
from typing import Any
from urllib.parse import quote, urlsplit

from ..checks import check_positive_int
from ..errors import CIRPluginsError, ConfigError, DataError, ImageLoadError, UnsafePathError, explain
from .searcher import MIME_TYPES, UPLOAD_FORMATS, GallerySearcher, decode_image_bytes

__all__ = ["create_app", "ALLOWED_TYPES", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_WORKERS", "DEFAULT_QUEUE",
           "LOCAL_HOSTS", "SEARCH_FIELDS"]

logger = logging.getLogger(__name__)

ALLOWED_TYPES = tuple(MIME_TYPES[f] for f in UPLOAD_FORMATS)
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024 * 1024
DEFAULT_WORKERS = 2  # decoding + model threads
DEFAULT_QUEUE = 8  # searches waiting for a worker before the next one is answered 503
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SEARCH_FIELDS = ("text", "k", "image_id", "reference_path", "image")
MAX_TEXT_CHARS = 2000
_JSON_OVERHEAD = 64 * 1024  # the text fields beside the base64 image
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", _CSP.encode()),
                     (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                     (b"cross-origin-resource-policy", b"same-origin")]
# an absolute path in a message (after the image root was replaced): "/x/y", "C:\x" (not "image/png")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/\\-])(?:/|[A-Za-z]:\\)[^\s'\",;)]*")


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _starlette():
    try:
        import starlette  # noqa: F401
    except ImportError as error:
        raise ConfigError(explain("the web page needs Starlette and uvicorn", got="import starlette failed",
                                  fix='pip install "cir-plugins[serve]"')) from error


def _public(message: str, root: str) -> str:
    """``message`` without any absolute path: the image root becomes "<image root>", other paths "<path>"."""
    return _ABSOLUTE_PATH.sub("<path>", message.replace(root.rstrip("/\\"), "<image root>"))


def _status_of(error: Exception) -> int:
    """The HTTP status of a library error met while answering a request."""
    if isinstance(error, UnsafePathError):
        return 403
    if isinstance(error, ImageLoadError):
        text = str(error)
        if " is missing" in text:
            return 404
        if "more pixels than allowed" in text or "past the pixel limit" in text:
            return 413
        return 415
    return 400


def _hostname(value: str) -> str:
    """The host part of a Host header or an Origin ("[::1]:8000" -> "::1", "Localhost:80" -> "localhost")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _Guard:
    """ASGI middleware in front of every route: the Host allow-list, the Origin check of a POST, and the security
    headers on every answer (those of the app's own error pages included)."""

    def __init__(self, app, allowed_hosts: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem, status = None, 400
        if _hostname(headers.get("host", "")) not in self.allowed:
            problem = explain("this server answers only requests addressed to its own host name",
                              got=headers.get("host", "no Host header")[:100], expected=sorted(self.allowed),
                              fix="open the page at http://127.0.0.1:PORT/ (or serve with --host NAME)")
        elif scope["method"] not in ("GET", "HEAD", "OPTIONS") and "origin" in headers:
            origin = urlsplit(headers["origin"])
            if origin.scheme not in ("http", "https") or _hostname(origin.netloc) not in self.allowed:
                problem, status = explain("a request from another site's page is refused", got=headers["origin"][:100],
                                  fix="use the search page served here, or send the request without an Origin "
                                      "header (curl, Python)"), 403
        if problem is not None:
            body = json.dumps({"error": problem}).encode()
            await secured({"type": "http.response.start", "status": status,
                           "headers": [(b"content-type", b"application/json"),
                                       (b"content-length", str(len(body)).encode())]})
            await secured({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, secured)


def create_app(searcher: GallerySearcher, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_k: int = 100,
               default_k: int = 10, title: str = "cir_plugins gallery search", workers: int = DEFAULT_WORKERS,
               queue: int = DEFAULT_QUEUE, allowed_hosts: tuple[str, ...] = LOCAL_HOSTS):
    """A Starlette app serving ``searcher`` (see the module doc); test it with
    ``TestClient(app, base_url="http://127.0.0.1")`` (the default "testserver" is not an allowed host).

    Args:
        max_upload_bytes: largest uploaded image (bytes, before base64).
        max_k, default_k: most results a search may ask for, and the page's default.
        workers, queue: threads that decode and run the model, and searches that may wait for one; beyond
            ``workers + queue`` searches in progress, a search is answered 503 (Retry-After: 1).
        allowed_hosts: the host names a request may be addressed to (its Host header; any port).
    """
    _starlette()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    for name, value in (("max_upload_bytes", max_upload_bytes), ("workers", workers), ("max_k", max_k),
                        ("default_k", default_k)):
        check_positive_int(name, value)
    check_positive_int("queue", queue, minimum=0)
    if isinstance(allowed_hosts, str) or not all(isinstance(h, str) and h for h in allowed_hosts):
        raise ConfigError(explain("allowed_hosts must be a tuple of host names", got=allowed_hosts,
                                  fix="e.g. ('127.0.0.1', 'localhost')"))
    if default_k > max_k:
        raise ConfigError(explain("default_k must be in 1..max_k", got=default_k, expected=f"1..{max_k}"))
    max_k = min(max_k, len(searcher.bank))  # a small gallery: at most every row
    default_k = min(default_k, max_k)
    body_limit = 4 * ((max_upload_bytes + 2) // 3) + _JSON_OVERHEAD  # base64 of the largest image + the fields
    root = str(searcher.images.root)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cir-plugins-serve")
    capacity = workers + queue
    busy = 0  # searches admitted and not finished (read on the event loop only)
    busy_lock = threading.Lock()
    page_html = _PAGE.replace("__TITLE__", html.escape(title))

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": _public(message, root)}, status_code=status, headers=headers)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(page_html)

    async def script(request: Request) -> Response:
        return Response(_SCRIPT, media_type="text/javascript; charset=utf-8")

    async def style(request: Request) -> Response:
        return Response(_STYLE, media_type="text/css; charset=utf-8")

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"gallery": len(searcher.gallery_ids), "rows": len(searcher.bank),
                             "index": searcher.index_name, "max_upload_bytes": max_upload_bytes,
                             "max_upload_pixels": searcher.max_pixels, "allowed_types": list(ALLOWED_TYPES),
                             "max_k": max_k, "default_k": default_k, "workers": workers, "queue": queue,
                             "busy": busy})

    async def gallery(request: Request) -> JSONResponse:
        params = request.query_params
        try:
            offset = max(0, int(params.get("offset", 0)))
            limit = min(500, max(1, int(params.get("limit", 60))))
        except ValueError:
            return error(400, "offset and limit must be integers")
        needle = params.get("q", "").strip().lower()
        ids = [i for i in searcher.gallery_ids if needle in i.lower()] if needle else searcher.gallery_ids
        return JSONResponse({"total": len(ids), "offset": offset, "ids": ids[offset:offset + limit]})

    async def image(request: Request) -> Response:
        image_id = request.path_params["image_id"]
        if not searcher.has_image(image_id):
            return error(404, explain("no gallery image with this id", got=image_id,
                                      fix="images are served by gallery id only (GET /api/gallery lists them)"))
        try:
            data, content_type = await run_in_threadpool(searcher.image_file, image_id)
        except (CIRPluginsError, OSError) as exc:
            status = _status_of(exc) if isinstance(exc, CIRPluginsError) else 404
            logger.warning("GET /image/%s refused: %s", image_id, exc)
            return error(404 if status == 400 else status, str(exc))
        return Response(data, media_type=content_type, headers={"cache-control": "private, max-age=300"})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        too_big = explain("the request is larger than the upload limit", got=f"{declared or 'over ' + str(body_limit)}"
                          " bytes", expected=f"an image of at most {max_upload_bytes} bytes (base64 in JSON)",
                          fix="upload a smaller image")
        if declared.isdigit() and int(declared) > body_limit:
            raise _Refused(413, too_big)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > body_limit:
                raise _Refused(413, too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    def fields_of(body: bytes) -> dict[str, Any]:
        try:
            fields = json.loads(body or b"{}")
        except (ValueError, RecursionError):  # RecursionError: a body of 100,000 nested brackets
            raise _Refused(400, "the request body is not valid JSON (or is nested too deeply)") from None
        if not isinstance(fields, dict):
            raise _Refused(400, explain("the JSON body must be an object", got=type(fields).__name__,
                                        expected="{text, k, image_id | reference_path | image}"))
        if unknown := sorted(set(fields) - set(SEARCH_FIELDS)):
            raise _Refused(400, explain("unknown fields in the search request", got=unknown[:5],
                                        expected=list(SEARCH_FIELDS)))
        text = fields.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _Refused(400, "type a modification text (the 'text' field is empty or not a string)")
        if len(text) > MAX_TEXT_CHARS:
            raise _Refused(400, explain("the modification text is too long", got=f"{len(text)} characters",
                                        expected=f"at most {MAX_TEXT_CHARS}"))
        k = fields.get("k", default_k)
        if not isinstance(k, int) or isinstance(k, bool):
            raise _Refused(400, explain("k must be an integer", got=repr(k)[:40], expected=f"1..{max_k}"))
        if not 1 <= k <= max_k:
            raise _Refused(400, explain("k is out of range", got=k if abs(k) < 10**12 else "a huge number",
                                        expected=f"1..{max_k}"))
        given = [name for name in ("image_id", "reference_path", "image") if fields.get(name) not in (None, "")]
        if len(given) != 1:
            raise _Refused(400, explain("give exactly one reference image", got=given or "none",
                                        expected="image_id, reference_path or image (base64)"))
        value = fields[given[0]]
        if not isinstance(value, str):
            raise _Refused(400, explain(f"{given[0]} must be a string", got=type(value).__name__))
        if given[0] == "image_id" and not searcher.has_image(value):
            raise _Refused(404, explain("no gallery image with this id", got=value[:200],
                                        fix="pick an id from GET /api/gallery"))
        if given[0] == "image":
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise _Refused(400, "the 'image' field is not base64 (send the file's bytes, base64-encoded)") \
                    from None
            if len(data) > max_upload_bytes:
                raise _Refused(413, explain("the uploaded image is larger than the upload limit",
                                            got=f"{len(data)} bytes", expected=f"at most {max_upload_bytes} bytes",
                                            fix="upload a smaller image"))
            fields["image"] = data
        return {"text": text, "k": k, given[0]: fields[given[0]]}

    def run_search(fields: dict[str, Any]) -> dict:
        """In a worker thread: decode the reference, compose, search."""
        picture = None
        if "image" in fields:
            picture = decode_image_bytes(fields["image"], max_pixels=searcher.max_pixels, what="the uploaded image")
        elif "reference_path" in fields:
            picture = searcher.open_relative(fields["reference_path"])
        return searcher.search(fields["text"], image_id=fields.get("image_id"), image=picture, k=fields["k"])

    async def search(request: Request) -> JSONResponse:
        nonlocal busy
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return error(415, explain("send the search as JSON", got=kind or "no content type",
                                      expected="Content-Type: application/json with {text, k, image_id | "
                                               "reference_path | image (base64)}"))
        with busy_lock:
            full = busy >= capacity
            busy += 0 if full else 1
        if full:
            return error(503, explain("the server is busy: every worker is taken and the queue is full",
                                      got=f"{capacity} searches in progress", fix="retry in a moment"),
                         headers={"retry-after": "1"})
        try:
            fields = fields_of(await read_body(request))
            found = await asyncio.get_running_loop().run_in_executor(pool, run_search, fields)
        except ClientDisconnect:
            return error(400, "the client went away before the request was complete")
        except _Refused as refused:
            return error(refused.status, refused.message, refused.headers)
        except (UnsafePathError, ImageLoadError, ConfigError, DataError) as exc:
            return error(_status_of(exc), str(exc))
        except Exception:  # the model broke the protocol, or a bug: the server's fault, not the request's
            logger.exception("search failed")
            return error(500, "the search failed inside the server (its log has the details)")
        finally:
            with busy_lock:
                busy -= 1
        for row in found["results"]:
            row["url"] = "/image/" + quote(row["id"], safe="")
        return JSONResponse(found)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        return error(500, "the request failed inside the server (its log has the details)")

    routes = [Route("/", page), Route("/static/page.js", script), Route("/static/page.css", style),
              Route("/api/info", info), Route("/api/gallery", gallery),
              Route("/image/{image_id:path}", image), Route("/api/search", search, methods=["POST"])]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown(wait=False, cancel_futures=True)  # the server stops: searches still queued are dropped

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan)
    app.state.searcher = searcher
    app.state.pool = pool
    app.add_middleware(_Guard, allowed_hosts=frozenset(_hostname(h) for h in allowed_hosts))
    return app


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/page.css">
</head><body>
<h1>__TITLE__</h1><div class="muted" id="info">loading...</div>
<div class="row">
 <div class="panel"><b>1. Reference image</b>: pick one from the gallery
  <div><input id="filter" type="text" placeholder="filter ids"> <span class="muted" id="count"></span></div>
  <div id="thumbs"></div>
  <div class="upload">or upload one: <input id="file" type="file"
  accept="image/png,image/jpeg,image/webp,image/gif,image/bmp"></div>
 </div>
 <div class="panel"><b>Chosen</b><div id="chosen" class="muted">none yet</div></div>
</div>
<div class="panel"><b>2. Modification text</b>
 <input id="text" type="text" placeholder="e.g. make it red and add a tree">
 k <input id="k" type="number" min="1" value="10">
 <button id="search">Search</button>
 <div id="error" role="alert"></div>
</div>
<div class="panel"><b>Top-k</b> <span class="muted" id="summary"></span><div id="results"></div></div>
<script src="/static/page.js"></script>
</body></html>
"""

_STYLE = """ body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
 h1{font-size:1.3em;margin:0 0 .3em} .muted{color:#666;font-size:.9em}
 .row{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
 .panel{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em;margin:.6em 0}
 #thumbs{display:grid;grid-template-columns:repeat(auto-fill,72px);gap:6px;max-width:640px;max-height:260px;overflow:auto}
 #thumbs img{width:72px;height:72px;object-fit:cover;border:3px solid transparent;cursor:pointer;
  image-rendering:pixelated}
 #thumbs img.selected{border-color:#1565c0}
 #chosen img{width:128px;height:128px;object-fit:contain;border:1px solid #ccc;image-rendering:pixelated}
 #results{display:grid;grid-template-columns:repeat(auto-fill,150px);gap:10px}
 .result{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:.8em;word-break:break-all}
 .result img{width:136px;height:136px;object-fit:contain;image-rendering:pixelated;background:#eee}
 .score{font-weight:bold} #error{color:#b00020;font-weight:bold;white-space:pre-wrap}
 input[type=text]{width:28em} button{padding:.3em 1em}
 #filter{width:16em} #k{width:4em} .upload{margin-top:.5em}
"""

_SCRIPT = r"""const $ = (id) => document.getElementById(id);
let chosenId = null, chosenFile = null, limits = null;
function showError(message) { $("error").textContent = message || ""; }
function choose(id, file) {
  chosenId = id; chosenFile = file;
  document.querySelectorAll("#thumbs img").forEach((img) => img.classList.toggle("selected", img.dataset.id === id));
  const box = $("chosen"); box.innerHTML = "";
  if (id) { const img = new Image(); img.src = "/image/" + encodeURIComponent(id); box.append(img,
  document.createElement("br"), id); }
  else if (file) { const img = new Image(); img.src = URL.createObjectURL(file); box.append(img,
  document.createElement("br"), "upload: " + file.name); }
  else { box.textContent = "none yet"; }
}
async function loadGallery() {
  const q = encodeURIComponent($("filter").value);
  const response = await fetch(`/api/gallery?limit=120&q=${q}`);
  const data = await response.json();
  $("count").textContent = `${data.total} images`;
  const box = $("thumbs"); box.innerHTML = "";
  for (const id of data.ids) {
    const img = new Image(); img.src = "/image/" + encodeURIComponent(id); img.title = id; img.dataset.id = id;
    img.className = "thumb"; img.onclick = () => { $("file").value = ""; choose(id, null); };
    box.append(img);
  }
}
function base64Of(file) {  // the file's bytes, base64 (the JSON API's "image" field)
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
async function search() {
  showError(""); $("summary").textContent = "searching...";
  const body = {text: $("text").value, k: Number($("k").value)};
  let data;
  try {
    if (chosenFile) body.image = await base64Of(chosenFile); else if (chosenId) body.image_id = chosenId;
    const response = await fetch("/api/search", {method: "POST", body: JSON.stringify(body),
                                                 headers: {"Content-Type": "application/json"}});
    data = await response.json();
    if (!response.ok) { showError(`${response.status}: ${data.error}`); $("summary").textContent = ""; return; }
  } catch (e) { showError("the server did not answer: " + e); $("summary").textContent = ""; return; }
  const box = $("results"); box.innerHTML = "";
  for (const r of data.results) {
    const card = document.createElement("div"); card.className = "result"; card.dataset.id = r.id;
    const img = new Image(); img.src = r.url; img.alt = r.id;
    const rank = document.createElement("div"); rank.textContent = `#${r.rank}`;
    const score = document.createElement("div"); score.className = "score"; score.textContent = r.score.toFixed(4);
    const name = document.createElement("div"); name.textContent = r.ids.join(" = ");
    card.append(img, rank, score, name); box.append(card);
  }
  $("summary").textContent = `${data.results.length} results (${data.index})`;
}
$("file").addEventListener("change", () => { const f = $("file").files[0]; if (f) choose(null, f); });
$("filter").addEventListener("input", loadGallery);
$("search").addEventListener("click", search);
$("text").addEventListener("keydown", (e) => { if (e.key === "Enter") search(); });
fetch("/api/info").then((r) => r.json()).then((data) => {
  limits = data; $("k").max = data.max_k; $("k").value = data.default_k;
  $("info").textContent = `${data.gallery} gallery images, ${data.rows} bank rows, search: ${data.index}, uploads up to
  ${data.max_upload_bytes >= 1048576 ? (data.max_upload_bytes / 1048576).toFixed(1) + " MB" :
  Math.round(data.max_upload_bytes / 1024) + " kB"}`;
});
loadGallery();
"""
