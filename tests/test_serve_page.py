"""The web page in a real browser (Debian's headless Chromium, driven by Selenium): log in, queue a job, watch
it finish, open it in the Deep Zoom viewer and zoom in until the full-resolution tiles have loaded."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from gigadiff.serve.app import VIEWER_SETUP, viewer_installed
from tests.helpers.served import served

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SETUP = "apt-get install -y chromium chromium-driver"


def _browser():
    if os.environ.get("GIGADIFF_NO_BROWSER"):
        pytest.skip("GIGADIFF_NO_BROWSER is set")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run `{SETUP}` (or set GIGADIFF_NO_BROWSER=1 to skip)")
    if not viewer_installed():
        pytest.fail(f"the page's viewer (OpenSeadragon) is not installed: run `{VIEWER_SETUP}`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_queue_watch_and_zoom_in_the_browser(tiny_sd_dir, tmp_path):
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        with served(tmp_path / "data", "--models", str(tiny_sd_dir.parent), "--token", "s3cret") as (url, _):
            driver.get(url + "/")
            assert driver.current_url.endswith("/login")
            driver.find_element(By.NAME, "token").send_keys("s3cret")
            driver.find_element(By.CSS_SELECTOR, "form button").click()
            _until(lambda: driver.current_url.rstrip("/") == url, 10, "the page after logging in")

            form = driver.find_element(By.ID, "job-form")
            form.find_element(By.NAME, "prompt").send_keys("a walled city")
            model = form.find_element(By.NAME, "model")
            model.clear()
            model.send_keys("tiny-sd")
            form.find_element(By.NAME, "size").send_keys("1024x768")
            form.find_element(By.NAME, "steps").send_keys("2")
            form.find_element(By.NAME, "extra").send_keys('{"tile": 512}')
            form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

            card = _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#queue .job"), 10, "the job in the queue")[0]
            _until(lambda: card.get_attribute("data-status") == "done", 240, "the job to finish")
            assert (
                card.find_element(By.CSS_SELECTOR, ".preview")
                .get_attribute("src")
                .startswith("data:image/jpeg;base64,")
            )  # a preview came over the events
            assert driver.find_element(By.ID, "form-error").text == ""

            card.find_element(By.CSS_SELECTOR, "button.view").click()
            loaded = "const v = window.gigadiff.viewer(); const item = v && v.world.getItemAt(0); " \
                     "return !!item && item.getFullyLoaded();"  # fmt: skip
            _until(lambda: driver.execute_script(loaded), 30, "the viewer's first tiles")
            table = driver.find_element(By.ID, "parameters").text
            assert "a walled city" in table and "1024x768" in table
            driver.execute_script("const v = window.gigadiff.viewer(); v.viewport.zoomTo(v.viewport.getMaxZoom(), "
                                  "null, true);")  # fmt: skip
            _until(lambda: driver.execute_script(loaded), 30, "the zoomed-in tiles")
            requests = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            top = 10  # ceil(log2(1024)): the full-resolution level
            assert any(f"/image_files/{top}/" in r for r in requests), requests
            assert all(r.startswith(url) or r.startswith("data:") for r in requests), "the page loaded from elsewhere"
            levels = {int(r.split("/image_files/")[1].split("/")[0]) for r in requests if "/image_files/" in r}
            assert min(levels) < top, "only one level was ever shown"
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "rendering"]
            assert not errors, errors  # no script error, no failed request (GPU notices of headless Chromium aside)
    finally:
        driver.quit()


def test_the_form_sends_a_start_image_loras_and_a_controlnet_as_the_api_takes_them(tiny_sd_dir, tmp_path):
    """The page's adapter fields: image files read into data URLs, LoRAs as a list of NAME[:SCALE], the ControlNet
    as NAME=IMAGE:SCALE; the server accepts the job (its models folder has the files named); a ControlNet without
    its image is refused on the page, before anything is sent."""
    import json
    import urllib.request

    from PIL import Image
    from selenium.webdriver.common.by import By

    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-sd").symlink_to(tiny_sd_dir)
    (models / "style.safetensors").write_bytes(b"{}")  # named only: the API checks the file is there
    (models / "canny").mkdir()
    start, control = tmp_path / "start.png", tmp_path / "edges.png"
    Image.new("RGB", (96, 64), (30, 90, 160)).save(start)
    Image.new("RGB", (96, 64), (250, 250, 250)).save(control)
    driver = _browser()
    try:
        with served(tmp_path / "data", "--models", str(models)) as (url, _):
            driver.get(url + "/")
            form = _until(lambda: driver.find_elements(By.ID, "job-form"), 10, "the form")[0]
            form.find_element(By.NAME, "prompt").send_keys("a harbour")
            model = form.find_element(By.NAME, "model")
            model.clear()
            model.send_keys("tiny-sd")
            form.find_element(By.CSS_SELECTOR, "#adapters summary").click()
            form.find_element(By.NAME, "control_model").send_keys("canny")
            form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            error = driver.find_element(By.ID, "form-error")
            _until(lambda: error.text, 10, "the page's refusal")
            assert "give both the ControlNet and its control image" in error.text
            assert not driver.find_elements(By.CSS_SELECTOR, "#queue .job")

            form.find_element(By.NAME, "init").send_keys(str(start))
            form.find_element(By.NAME, "strength").send_keys("0.55")
            form.find_element(By.NAME, "lora").send_keys("style.safetensors:0.8, style.safetensors")
            form.find_element(By.NAME, "control_image").send_keys(str(control))
            form.find_element(By.NAME, "control_scale").send_keys("0.7")
            form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            card = _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#queue .job"), 10, "the job in the queue")[0]
            assert error.text == ""
            with urllib.request.urlopen(f"{url}/api/jobs/{card.get_attribute('data-id')}") as response:
                request = json.load(response)["request"]
            assert request["strength"] == 0.55
            assert request["lora"] == ["style.safetensors:0.8", "style.safetensors"]
            assert request["init"].startswith("data:image/png;base64,")
            [item] = request["control"]
            assert item.startswith("canny=data:image/png;base64,") and item.endswith(":0.7")
    finally:
        driver.quit()
