"""The serve page in a real headless browser (Debian's chromium + chromium-driver, driven by selenium).

uvicorn serves the app on a free port of 127.0.0.1 (in a thread of this process); the browser picks a
gallery image, types a text, searches and the test checks that the results render (each image loaded)
in the order the JSON endpoint gives; then a non-image upload, an oversized upload and a path outside the
image root each get a clear error, and a last search through the page still works. A screenshot is saved
under the test's tmp dir (and copied to $CIR_PLUGINS_SCREENSHOT when set).

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
    for module in ("selenium", "starlette", "uvicorn", "python_multipart"):
        try:
            __import__(module)
        except ImportError:
            _require(module, 'pip install -e ".[test]" (it lists the serve extra and selenium)')
    return paths


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(browser_bits, tmp_path_factory):
    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_training_toy import make_model

    from cir_plugins.data.cirr import load_cirr
    from cir_plugins.data.fixtures import build_cirr_tree
    from cir_plugins.negatives.bank import NegativeBank
    from cir_plugins.serve import GallerySearcher, create_app

    root = build_cirr_tree(tmp_path_factory.mktemp("browser") / "cirr", n_images=14)
    split = load_cirr(root, "val", size=4)
    model = make_model(dim=16, seed=3).eval()
    bank = NegativeBank.build(model, split.gallery_ids, split.images, dedup=False, show_progress=False)
    app = create_app(GallerySearcher(model, bank, split.images), max_upload_bytes=20_000, default_k=6)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)
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
    yield base, split
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

    base, split = server
    wait = WebDriverWait(driver, 30)
    driver.get(base + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img.thumb")) == len(split.gallery_ids))
    wait.until(EC.text_to_be_present_in_element((By.ID, "info"), "gallery images"))
    reference = split.gallery_ids[3]
    driver.find_element(By.CSS_SELECTOR, f'#thumbs img[data-id="{reference}"]').click()
    text = "make it black and white"
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
    assert "not accepted" in driver.find_element(By.ID, "error").text
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"<html>a saved error page</html>")
    upload_and_expect(fake, "not a readable image")
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
