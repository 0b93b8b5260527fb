"""The web page of ``deepcount serve`` in a real (headless) Chromium, driven by Selenium:
choose a real photo, upload it, read the count and see the overlay.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: ``apt-get install chromium
chromium-driver``).  Without them the test is skipped -- unless the environment variable CI
is set, where it fails: CI must run it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from PIL import Image

from deepcount import Counter
from deepcount.serve import ServeSettings, create_app, running


CHROMIUM = os.environ.get("DEEPCOUNT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DEEPCOUNT_CHROMEDRIVER", "/usr/bin/chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(f"browser test skipped: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1100,1100"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.set_page_load_timeout(30)
    d.set_script_timeout(30)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def server(counter: Counter):
    with running(create_app(counter, ServeSettings(max_concurrency=1, queue=2, timeout=120))) as url:
        yield url


@pytest.fixture(scope="module")
def crop_file(photo_path: Path, tmp_path_factory) -> Path:
    """The top-left 384x512 of IMG_1.jpg as a JPEG file (one tile)."""
    src = photo_path
    path = tmp_path_factory.mktemp("upload") / "IMG_1_crop.jpg"
    with Image.open(src) as im:
        im.crop((0, 0, 512, 384)).save(path, format="JPEG", quality=90)
    return path


def _wait_for_answer(driver, timeout: float = 90) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "count").text.strip()
        or d.find_element(By.ID, "error").is_displayed())


def test_upload_shows_the_count_and_the_overlay(driver, server, crop_file, counter, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = counter.count(crop_file).count
    driver.get(server + "/")
    assert driver.title == "deepcount"
    driver.find_element(By.ID, "file").send_keys(str(crop_file))
    driver.find_element(By.ID, "submit").click()
    _wait_for_answer(driver)

    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    count = driver.find_element(By.ID, "count")
    shown = count.text.strip()
    n = math.floor(expected + 0.5)  # JavaScript's Math.round
    prose = "almost no one" if n == 0 else "about 1 person" if n == 1 else f"about {n:,} people"
    assert shown == prose, (shown, expected)  # rounded in prose, as a person says it ...
    assert f"Exact count {expected:.2f};" in driver.find_element(By.ID, "details").text  # ... exact beside
    assert float(count.get_attribute("data-count")) == expected  # and the full value, exactly

    overlay = driver.find_element(By.ID, "overlay")
    size = WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "const i = document.getElementById('overlay');"
        "return i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null;"))
    assert size[1] == 384 and size[0] > 512  # the photo's size, and its colour bar beside
    assert overlay.is_displayed()
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert "baseline" in driver.find_element(By.ID, "model").text.lower()

    shot = tmp_path / "deepcount-page.png"
    assert driver.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] > 0
    print(f"screenshot: {shot}")


def test_a_bad_file_shows_the_error(driver, server, tmp_path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo at all\n")
    driver.get(server + "/")
    driver.find_element(By.ID, "file").send_keys(str(bad))
    driver.find_element(By.ID, "submit").click()
    _wait_for_answer(driver, timeout=30)
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "422" in error.text and "not a recognised image format" in error.text
    assert driver.find_element(By.ID, "count").text.strip() == ""
