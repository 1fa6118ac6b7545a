"""The serve page in a real headless browser (Debian's chromium + chromium-driver, driven by selenium).

The model is the quickstart's, on its quick budget (examples/quickstart.py: the synthetic world's scenes, the tiny
CLIP pretrained on their captions, then CLIP4Cir's stage 1 on the annotated triplets), and the gallery is the
world's test split: real scenes and a real query from its annotations. uvicorn serves the app (serve.server_config)
on a free port of 127.0.0.1 in a thread of this process; the browser picks the query's reference image, types its
modification text, searches and the test checks that the results render (each image loaded) in the order the JSON
endpoint gives; then a non-image, another image format and an oversized upload and a path outside the image root
each get a clear error, and a last search through the page (an upload) still works. A screenshot is saved under the
test's tmp dir (and copied to $CIR_PLUGINS_SCREENSHOT when set: benchmarks/serve_screenshot.png is made so).

Marker ``browser``: ``python -m pytest -q -m browser`` runs it alone. Without chromium it skips, naming
the install command, except where ``CIR_PLUGINS_BROWSER_TEST=required`` (CI installs the browser and sets
it), where a missing browser fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


def _browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _require(what: str, reason: str):
    if os.environ.get("CIR_PLUGINS_BROWSER_TEST") == "required":
        pytest.fail(f"{what} is required here (CIR_PLUGINS_BROWSER_TEST=required): {reason}")
    pytest.skip(f"{what} not available: {reason}")


@pytest.fixture(scope="module")
def browser_bits():
    paths = _browser_paths()
    if paths is None:
        _require("chromium and chromium-driver", f"install them with `{INSTALL}`")
    for module in ("selenium", "starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            _require(module, 'pip install -e ".[test]" (it lists the serve extra and selenium)')
    return paths


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _quick_model_and_gallery(work: Path):
    """The quickstart's quick path: its world, its tiny CLIP and its stage 1; the world's test split as gallery."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    if str(examples) not in sys.path:
        sys.path.insert(0, str(examples))
    import quickstart

    from cir_plugins.data.cirr import load_cirr
    from cir_plugins.data.images import ClipTransform
    from cir_plugins.data.synthetic import make_world

    budget = quickstart.BUDGETS["quick"]
    world = dict(budget.world)
    root = make_world(work / "world", seed=0, size=world)
    transform = ClipTransform("targetpad", world["image_size"], mean=quickstart.MEAN, std=quickstart.STD)
    train = load_cirr(root, "train", transform=transform)
    test = load_cirr(root, "test", transform=transform)
    quickstart.seed_everything(0)
    clip_dir = quickstart.make_clip(root, train, train.images, budget, work / "cache", 0, "cpu", False)
    annotated = [t for t in train.triplets if t.target is not None]
    model = quickstart.stage1(clip_dir, annotated, train.images, budget, 0, "cpu", steps=budget.stage1_steps,
                              share=None, show_progress=False)
    return model.eval(), test


@pytest.fixture(scope="module")
def server(browser_bits, tmp_path_factory):
    import torch
    import uvicorn

    from cir_plugins.negatives.bank import NegativeBank
    from cir_plugins.serve import GallerySearcher, create_app, server_config

    torch.set_num_threads(1)
    model, test = _quick_model_and_gallery(tmp_path_factory.mktemp("browser"))
    bank = NegativeBank.build(model, test.gallery_ids, test.images, show_progress=False)
    searcher = GallerySearcher(model, bank, test.images)
    # the query shown: among the first annotated test queries, the one whose target the model ranks best
    queries = [t for t in test.triplets if t.target is not None][:20]

    def target_rank(t):
        found = [r["ids"] for r in searcher.search(t.texts[0], image_id=t.reference, k=len(bank) - 1)["results"]]
        return next((rank for rank, ids in enumerate(found) if t.target in ids), len(found))

    query = min(queries, key=target_rank)
    app = create_app(searcher, max_upload_bytes=20_000, default_k=6, title="cir_plugins: the quickstart's model "
                     "over the synthetic world's test gallery")
    port = _free_port()
    uv = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(base + "/api/info", timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail("the uvicorn server did not start within 30 s")
            time.sleep(0.1)
    yield base, test, query
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def driver(browser_bits, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_bits
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1200,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


def _post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_search_renders_and_refusals_are_shown(server, driver, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    base, split, query = server
    wait = WebDriverWait(driver, 30)
    driver.get(base + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img.thumb")) == min(120, len(split.gallery_ids)))
    wait.until(EC.text_to_be_present_in_element((By.ID, "info"), "gallery images"))
    reference, text = query.reference, query.texts[0]
    driver.find_element(By.ID, "filter").send_keys(reference)  # the gallery list is filtered by id
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, f'#thumbs img[data-id="{reference}"]')) == 1)
    driver.find_element(By.CSS_SELECTOR, f'#thumbs img[data-id="{reference}"]').click()
    driver.find_element(By.ID, "text").send_keys(text)

    def search_and_wait_for(count: int) -> None:
        driver.execute_script("document.getElementById('results').innerHTML = '';")
        driver.find_element(By.ID, "search").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == count)

    search_and_wait_for(6)
    shown = [e.get_attribute("data-id") for e in driver.find_elements(By.CSS_SELECTOR, "#results .result")]
    status, expected = _post_json(base + "/api/search", {"text": text, "image_id": reference, "k": 6})
    assert status == 200 and shown == [r["id"] for r in expected["results"]] and reference not in shown
    scores = [float(e.text) for e in driver.find_elements(By.CSS_SELECTOR, "#results .result .score")]
    assert scores == pytest.approx([r["score"] for r in expected["results"]], abs=1e-4)
    assert scores == sorted(scores, reverse=True)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert driver.find_element(By.ID, "error").text == ""
    shot = tmp_path / "serve_search.png"
    assert driver.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.size[0] >= 800 and image.getextrema() != ((255, 255),) * 3
    if os.environ.get("CIR_PLUGINS_SCREENSHOT"):
        shutil.copy(shot, os.environ["CIR_PLUGINS_SCREENSHOT"])

    def upload_and_expect(path: Path, words: str) -> None:
        driver.find_element(By.ID, "file").send_keys(str(path))
        driver.find_element(By.ID, "search").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "error"), words))

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    upload_and_expect(notes, "415")
    assert "accepted: PNG, JPEG, WEBP, GIF, BMP" in driver.find_element(By.ID, "error").text
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"<html>a saved error page</html>")
    upload_and_expect(fake, "not a readable image")
    tiff = tmp_path / "scan.tif"
    Image.new("RGB", (8, 8)).save(tiff)
    upload_and_expect(tiff, "415")
    big = tmp_path / "big.png"
    Image.effect_noise((200, 200), 60).convert("RGB").save(big)  # ~100 kB > the 20 kB limit
    upload_and_expect(big, "413")
    status, answer = _post_json(base + "/api/search", {"text": text, "reference_path": "../../../../etc/passwd"})
    assert status == 403 and "climbs out" in answer["error"]
    status, answer = _post_json(base + "/api/search", {"text": text, "reference_path": "/etc/passwd"})
    assert status == 403 and "absolute" in answer["error"]
    with urllib.request.urlopen(base + "/api/info", timeout=10) as response:
        assert response.status == 200  # still serving
    # an accepted upload (a gallery file) searches through the page again
    driver.find_element(By.ID, "file").send_keys(str(split.images.path_of(reference)))
    search_and_wait_for(6)
    assert driver.find_element(By.ID, "error").text == ""
