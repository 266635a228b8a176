"""The interactive API docs on a machine without internet: Chromium reaches only the service, and both pages
still list the operations, every script and style coming from the service itself."""

from __future__ import annotations

import pytest
from local_server import serve_in_thread

from kosmos_serve.config import ServerSettings
from kosmos_serve.server.app import create_api

pytest.importorskip("selenium")
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

WAIT_S = 60  # ReDoc lays out the whole spec before it shows anything
OPERATIONS = [("post", "/predict"), ("post", "/v1/generate"), ("get", "/v1/tasks"), ("post", "/v1/chat/completions")]
CDN_ASSET = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"  # FastAPI's default for /docs


@pytest.fixture(scope="module")
def service_url(demo_engine):
    """A service on loopback, API key required (the docs and their assets are open without it)."""
    app = create_api(ServerSettings(api_key="s3cret", warmup=False), demo_engine.settings, engine=demo_engine)
    with serve_in_thread(app) as base_url:
        yield base_url


def test_the_browser_reaches_no_other_host(offline_browser, service_url):
    offline_browser.get(f"{service_url}/health")
    outcome = offline_browser.execute_async_script(
        "fetch(arguments[0]).then(() => arguments[1]('reached'), () => arguments[1]('blocked'))", CDN_ASSET)
    assert outcome == "blocked"


def test_swagger_ui_lists_the_operations_offline(offline_browser, service_url):
    offline_browser.get(f"{service_url}/docs")
    wait_for(offline_browser, ".opblock-summary-path")
    listed = {(block.get_attribute("class"), path.get_attribute("data-path"))
              for block in offline_browser.find_elements(By.CSS_SELECTOR, ".opblock")
              for path in block.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    for method, path in OPERATIONS:
        assert any(f"opblock-{method}" in classes.split() and shown == path for classes, shown in listed), path
    assert loaded_only_from(offline_browser, service_url)


def test_redoc_lists_the_operations_offline(offline_browser, service_url):
    offline_browser.get(f"{service_url}/redoc")
    wait_for(offline_browser, "[data-section-id^='tag/'], [data-section-id^='operation/']")
    text = offline_browser.execute_script("return document.body.textContent")
    for method, path in OPERATIONS:
        assert f"{method}{path}" in text.replace(" ", ""), path  # each operation's endpoint: its verb, then its path
    assert loaded_only_from(offline_browser, service_url)


def wait_for(driver, css: str) -> list:
    """The elements at `css` once the page has drawn them (a page whose scripts never came stays blank)."""
    try:
        return WebDriverWait(driver, WAIT_S).until(lambda page: page.find_elements(By.CSS_SELECTOR, css))
    except TimeoutException:
        shown = driver.find_element(By.TAG_NAME, "body").text[:300]
        pytest.fail(f"nothing matched {css!r} in {WAIT_S} s; the page reads: {shown!r}")


def loaded_only_from(driver, base_url: str) -> bool:
    """Whether every script, style and fetch the page made went to `base_url` (and it made some).

    (ReDoc's own "API docs by Redocly" logo, an image, is refused by the page's content policy before it leaves.)
    """
    resources = driver.execute_script("return performance.getEntriesByType('resource')"
                                      ".filter(entry => entry.initiatorType !== 'img').map(entry => entry.name)")
    return bool(resources) and all(name.startswith(f"{base_url}/") for name in resources)
