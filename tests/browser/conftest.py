"""The demo page in a real headless Chromium, driven by Selenium through Debian's matching chromedriver.

The service runs on loopback in a thread, on `demo_engine` (the shipped demo model, which really grounds
the synthetic scenes of `examples/scene-*.png`). A failing browser test leaves a screenshot of the page and names it in its report.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest
from local_server import serve_in_thread

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1400, 1000)


def need(condition: bool, reason: str) -> None:
    """Skip when something the browser tests need is missing; in CI (`CI` set), fail instead."""
    if not condition:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{reason} (.ci/run installs it)")


@pytest.fixture(scope="session")
def demo_engine():
    """The model behind the page: the shipped demo model (synthetic shapes), as `kosmos-serve demo --model demo`."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine

    return Engine(EngineSettings(model="demo", device="cpu", max_batch_rows=8))


@pytest.fixture(scope="module")
def demo_url(demo_engine):
    """The demo page of a ready service on loopback, serving `demo_engine`."""
    need(_importable("gradio"), "gradio is not installed")
    from kosmos_serve.asgi import create_app
    from kosmos_serve.config import ServerSettings

    app = create_app(ServerSettings(), demo_engine.settings, engine=demo_engine)
    with serve_in_thread(app) as base_url:
        deadline = time.monotonic() + 60
        while httpx.get(f"{base_url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.05)
        yield f"{base_url}/demo/"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium; files it downloads land in `browser.download_dir`."""
    download_dir = tmp_path_factory.mktemp("downloads")
    driver = start_chromium(prefs={"download.default_directory": str(download_dir)})
    driver.download_dir = download_dir
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def offline_browser():
    """Headless Chromium that reaches 127.0.0.1 only: every other host name fails to resolve, as off the network."""
    driver = start_chromium("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    yield driver
    driver.quit()


def start_chromium(*arguments: str, prefs: dict | None = None):
    """Debian's Chromium, headless, through Debian's chromedriver (no driver download), with these extra arguments."""
    need(_importable("selenium"), "selenium is not installed")
    need(os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), "Debian's chromium and chromium-driver are missing")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", *arguments):
        options.add_argument(argument)
    if prefs:
        options.add_experimental_option("prefs", prefs)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def page(demo_url, browser, tmp_path):  # the browser quits before the server stops
    """The browser on a freshly loaded demo page, ready for input (a failure's screenshot goes to `tmp_path`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(demo_url)
    WebDriverWait(browser, 30).until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#run")))
    return browser


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When a test using `page` fails, save a screenshot of the page and name it in the report."""
    report = (yield).get_result()
    driver = item.funcargs.get("page") if hasattr(item, "funcargs") else None
    if report.when == "call" and report.failed and driver is not None:
        path = item.funcargs["tmp_path"] / "failure.png"
        driver.save_screenshot(str(path))
        report.sections.append(("browser", f"screenshot of the page: {path}"))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
