"""The web page and JSON endpoints over a :class:`GallerySearcher` (Starlette; served by uvicorn).

Routes:

- ``GET /``: the page: pick a gallery image (filterable thumbnails) or upload one, type a
  modification text, see the top-k with scores.
- ``GET /api/info``: gallery size, index, limits.
- ``GET /api/gallery?q=&offset=&limit=``: gallery ids (filtered by substring).
- ``GET /image/{id}``: a gallery image, by id only (the file is resolved under the image root with
  the package's root and symlink checks; any other id is a 404).
- ``POST /api/search``: JSON ``{"text", "image_id" | "reference_path", "k"}`` (``reference_path``:
  a path relative to the image root, refused with 403 when it leaves the root), or a multipart form
  with ``text``, ``k`` and ``image_id`` or ``file`` (an upload). Returns ``{"index", "results":
  [{"rank", "id", "ids", "score", "url"}]}``.

Limits: the request body (uploads included) is read up to ``max_upload_bytes`` and refused with 413
beyond; an upload must declare an image type (PNG, JPEG, WebP, GIF, BMP) and decode (else 415) within
the pixel limit (else 413). Every refusal is a JSON ``{"error": message}`` with a 4xx status, and the
server keeps serving. Requires the ``serve`` extra (``pip install "cir-plugins[serve]"``).
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from ..errors import (CIRPluginsError, ConfigError, DataError, ImageLoadError, UnsafePathError, explain)
from .searcher import GallerySearcher, decode_image_bytes

__all__ = ["create_app", "ALLOWED_TYPES", "DEFAULT_MAX_UPLOAD_BYTES"]

logger = logging.getLogger(__name__)

ALLOWED_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024 * 1024
_FORM_OVERHEAD = 64 * 1024  # multipart headers and the text fields beside the file


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _starlette():
    try:
        import starlette  # noqa: F401
    except ImportError as error:
        raise ConfigError(explain("the web page needs Starlette and uvicorn", got="import starlette failed",
                                  fix='pip install "cir-plugins[serve]"')) from error


def create_app(searcher: GallerySearcher, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_k: int = 100,
               default_k: int = 10, title: str = "cir_plugins gallery search"):
    """A Starlette app serving ``searcher`` (see the module doc). Test it with ``starlette.testclient``."""
    _starlette()
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.routing import Route

    if not isinstance(max_upload_bytes, int) or max_upload_bytes < 1:
        raise ConfigError(explain("max_upload_bytes must be a positive int", got=max_upload_bytes))
    max_k = min(max_k, len(searcher.bank))
    if not 1 <= default_k <= max_k:
        raise ConfigError(explain("default_k must be in 1..max_k", got=default_k, expected=f"1..{max_k}"))
    body_limit = max_upload_bytes + _FORM_OVERHEAD

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(_PAGE.replace("__TITLE__", title))

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"gallery": len(searcher.gallery_ids), "rows": len(searcher.bank),
                             "index": searcher.index_name, "max_upload_bytes": max_upload_bytes,
                             "allowed_types": list(ALLOWED_TYPES), "max_k": max_k, "default_k": default_k})

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

    async def image(request: Request):
        image_id = request.path_params["image_id"]
        if not searcher.has_image(image_id):
            return error(404, explain("no gallery image with this id", got=image_id,
                                      fix="images are served by gallery id only (GET /api/gallery lists them)"))
        try:
            path = searcher.path_of(image_id)
        except UnsafePathError as exc:
            return error(403, str(exc))
        if not path.is_file():
            return error(404, explain("the image file of this id is missing", got=image_id,
                                      fix="run cir-plugins check-data on the dataset"))
        return FileResponse(path)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > body_limit:
            raise _Refused(413, explain("the request is larger than the upload limit", got=f"{declared} bytes",
                                        expected=f"at most {max_upload_bytes} bytes of image",
                                        fix="upload a smaller image"))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > body_limit:
                raise _Refused(413, explain("the request is larger than the upload limit", got=f"over {size} bytes",
                                            expected=f"at most {max_upload_bytes} bytes of image",
                                            fix="upload a smaller image"))
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse_form(request: Request, body: bytes) -> dict[str, Any]:
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        fields: dict[str, Any] = {key: value for key, value in form.items() if isinstance(value, str)}
        upload = form.get("file")
        if upload is not None and not isinstance(upload, str) and getattr(upload, "filename", ""):
            kind = (upload.content_type or "").split(";")[0].strip().lower()
            if kind not in ALLOWED_TYPES:
                raise _Refused(415, explain("this upload type is not accepted", got=kind or "no type",
                                            expected=", ".join(ALLOWED_TYPES), fix="upload an image file"))
            data = await upload.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise _Refused(413, explain("the uploaded image is larger than the limit", got=f"over {max_upload_bytes} bytes",
                                            expected=f"at most {max_upload_bytes} bytes", fix="upload a smaller image"))
            fields["upload"] = (upload.filename, data)
        return fields

    async def search(request: Request) -> JSONResponse:
        try:
            body = await read_body(request)
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind == "application/json":
                try:
                    fields = json.loads(body or b"{}")
                except ValueError:
                    raise _Refused(400, "the request body is not valid JSON") from None
                if not isinstance(fields, dict):
                    raise _Refused(400, "the JSON body must be an object {text, image_id | reference_path, k}")
            elif kind == "multipart/form-data":
                fields = await parse_form(request, body)
            else:
                raise _Refused(415, explain("send JSON or a multipart form", got=kind or "no content type",
                                            expected="application/json or multipart/form-data"))
            text = fields.get("text")
            if not isinstance(text, str) or not text.strip():
                raise _Refused(400, "type a modification text (the 'text' field is empty)")
            try:
                k = int(fields.get("k", default_k))
            except (TypeError, ValueError):
                raise _Refused(400, explain("k must be an integer", got=fields.get("k"))) from None
            if not 1 <= k <= max_k:
                raise _Refused(400, explain("k is out of range", got=k, expected=f"1..{max_k}"))
            image_id, reference_path, upload = fields.get("image_id") or None, fields.get("reference_path"), \
                fields.get("upload")
            given = [name for name, value in (("image_id", image_id), ("reference_path", reference_path),
                                              ("file", upload)) if value]
            if len(given) != 1:
                raise _Refused(400, explain("give exactly one reference image", got=given or "none",
                                            expected="image_id, reference_path or an uploaded file"))
            if image_id is not None and not searcher.has_image(str(image_id)):
                raise _Refused(404, explain("no gallery image with this id", got=image_id,
                                            fix="pick an id from GET /api/gallery"))
            picture = None
            if upload is not None:
                try:
                    picture = decode_image_bytes(upload[1], max_pixels=searcher.max_pixels,
                                                 what=f"the upload {upload[0]!r}")
                except ImageLoadError as exc:
                    raise _Refused(413 if "more pixels" in str(exc) else 415, str(exc)) from None
            elif reference_path:
                if not isinstance(reference_path, str):
                    raise _Refused(400, "reference_path must be a string")
                picture = searcher.open_relative(reference_path)
            found = searcher.search(text, image_id=str(image_id) if image_id else None, image=picture, k=k)
        except _Refused as refused:
            return error(refused.status, refused.message)
        except UnsafePathError as exc:
            return error(403, str(exc))
        except ImageLoadError as exc:
            return error(404 if "names no file" in str(exc) else 415, str(exc))
        except (ConfigError, DataError) as exc:
            return error(400, str(exc))
        except CIRPluginsError as exc:  # the model broke the protocol: the server's fault, not the request's
            logger.exception("search failed")
            return error(500, str(exc))
        for row in found["results"]:
            row["url"] = "/image/" + quote(row["id"], safe="")
        return JSONResponse(found)

    routes = [Route("/", page), Route("/api/info", info), Route("/api/gallery", gallery),
              Route("/image/{image_id:path}", image), Route("/api/search", search, methods=["POST"])]
    app = Starlette(routes=routes)
    app.state.searcher = searcher
    return app


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
 h1{font-size:1.3em;margin:0 0 .3em} .muted{color:#666;font-size:.9em}
 .row{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
 .panel{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em;margin:.6em 0}
 #thumbs{display:grid;grid-template-columns:repeat(auto-fill,72px);gap:6px;max-width:640px;max-height:260px;overflow:auto}
 #thumbs img{width:72px;height:72px;object-fit:cover;border:3px solid transparent;cursor:pointer;image-rendering:pixelated}
 #thumbs img.selected{border-color:#1565c0}
 #chosen img{width:128px;height:128px;object-fit:contain;border:1px solid #ccc;image-rendering:pixelated}
 #results{display:grid;grid-template-columns:repeat(auto-fill,150px);gap:10px}
 .result{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:.8em;word-break:break-all}
 .result img{width:136px;height:136px;object-fit:contain;image-rendering:pixelated;background:#eee}
 .score{font-weight:bold} #error{color:#b00020;font-weight:bold;white-space:pre-wrap}
 input[type=text]{width:28em} button{padding:.3em 1em}
</style></head><body>
<h1>__TITLE__</h1><div class="muted" id="info">loading...</div>
<div class="row">
 <div class="panel"><b>1. Reference image</b>: pick one from the gallery
  <div><input id="filter" type="text" placeholder="filter ids" style="width:16em"> <span class="muted" id="count"></span></div>
  <div id="thumbs"></div>
  <div style="margin-top:.5em">or upload one: <input id="file" type="file" accept="image/*"></div>
 </div>
 <div class="panel"><b>Chosen</b><div id="chosen" class="muted">none yet</div></div>
</div>
<div class="panel"><b>2. Modification text</b>
 <input id="text" type="text" placeholder="e.g. make it red and add a tree">
 k <input id="k" type="number" min="1" value="10" style="width:4em">
 <button id="search">Search</button>
 <div id="error" role="alert"></div>
</div>
<div class="panel"><b>Top-k</b> <span class="muted" id="summary"></span><div id="results"></div></div>
<script>
const $ = (id) => document.getElementById(id);
let chosenId = null, chosenFile = null, limits = null;
function showError(message) { $("error").textContent = message || ""; }
function choose(id, file) {
  chosenId = id; chosenFile = file;
  document.querySelectorAll("#thumbs img").forEach((img) => img.classList.toggle("selected", img.dataset.id === id));
  const box = $("chosen"); box.innerHTML = "";
  if (id) { const img = new Image(); img.src = "/image/" + encodeURIComponent(id); box.append(img, document.createElement("br"), id); }
  else if (file) { const img = new Image(); img.src = URL.createObjectURL(file); box.append(img, document.createElement("br"), "upload: " + file.name); }
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
async function search() {
  showError(""); $("summary").textContent = "searching...";
  const form = new FormData();
  form.append("text", $("text").value); form.append("k", $("k").value);
  if (chosenFile) form.append("file", chosenFile); else if (chosenId) form.append("image_id", chosenId);
  let data;
  try {
    const response = await fetch("/api/search", {method: "POST", body: form});
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
  $("info").textContent = `${data.gallery} gallery images, ${data.rows} bank rows, search: ${data.index}, uploads up to ${data.max_upload_bytes >= 1048576 ? (data.max_upload_bytes / 1048576).toFixed(1) + " MB" : Math.round(data.max_upload_bytes / 1024) + " kB"}`;
});
loadGallery();
</script></body></html>
"""
