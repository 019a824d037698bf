"""The served page in headless Chromium: type a Chinese prompt, see the router's plan, get an image, keep a screenshot.

Needs Debian's browser and driver (``apt-get install -y chromium chromium-driver``) and selenium (``pip install -e
".[test,browser]"``); run with ``python -m pytest -m browser tests/test_serve_browser.py``. The screenshot goes to
``$POLYBRIDGE_SCREENSHOT`` (default: pytest's tmp dir); the README's is ``docs/serve-page.png``.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from polybridge.pipeline import PolyBridgePipeline
    from polybridge.serve.app import ServeOptions, create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = PolyBridgePipeline.from_registry(languages=["en", "zh", "ja"])
    pipe.set_progress_bar_config(disable=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(pipe, ServeOptions(max_batch=8, max_wait_ms=20)), host="127.0.0.1",
                            port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(300):
        if srv.started:
            break
        time.sleep(0.1)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1000,900"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_chinese_prompt_shows_its_plan_and_gets_an_image(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("左边有一个红色的灯笼, on a black background")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#plan .span[data-language='zh']")))
    spans = browser.find_elements(By.CSS_SELECTOR, "#plan .span")
    assert [s.get_attribute("data-language") for s in spans] == ["zh", "en"]
    assert "zh branch" in spans[0].text and "backbone text encoder" in spans[1].text
    assert spans[0].value_of_css_property("background-color") != spans[1].value_of_css_property("background-color")
    assert "none" in browser.find_element(By.ID, "plugins").text  # the registry names no plugins today
    for field, value in (("steps", "8"), ("seed", "7")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img.result")) == 4)
    images = browser.find_elements(By.CSS_SELECTOR, "#results img.result")
    assert all(d.get_attribute("naturalWidth") == "32" for d in images)
    assert "seed 7" in browser.find_element(By.ID, "results").text
    assert "done in" in browser.find_element(By.ID, "status").text
    shot = Path(os.environ.get("POLYBRIDGE_SCREENSHOT", tmp_path / "serve-page.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000
