"""The two pages in a real headless Chromium against the real server (uvicorn on a loopback port)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from doratweet.predict import SentimentClassifier
from doratweet.serve import create_app

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
API_KEY = "browser-test-key"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
                       "/usr/bin/chromedriver): apt-get install chromium chromium-driver"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run_dir, tmp_path_factory):
    import uvicorn

    run_dir = tiny_run_dir
    app = create_app(SentimentClassifier.load(run_dir), run_dir=run_dir, api_key=API_KEY)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1000,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def wait_for(browser, condition, seconds: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds).until(condition)


def test_typing_tweets_shows_a_label_and_three_bars_each(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    key_field = wait_for(browser, lambda b: b.find_element(By.ID, "api-key") if b.find_element(
        By.ID, "key-field").is_displayed() else None)
    key_field.send_keys(API_KEY)
    browser.find_element(By.ID, "tweets").send_keys("I love this phone\nworst service ever")
    browser.find_element(By.ID, "classify").click()
    results = wait_for(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .result")) == 2 and
                       b.find_elements(By.CSS_SELECTOR, "#results .result"))

    for result, tweet in zip(results, ["I love this phone", "worst service ever"]):
        assert tweet in result.find_element(By.CLASS_NAME, "text").text
        label = result.find_element(By.CLASS_NAME, "label").text.lower()
        rows = result.find_elements(By.CLASS_NAME, "bar-row")
        assert [r.get_attribute("data-label") for r in rows] == ["negative", "neutral", "positive"]
        probabilities = {r.get_attribute("data-label"): float(r.get_attribute("data-probability")) for r in rows}
        assert label == max(probabilities, key=probabilities.get)
        assert abs(sum(probabilities.values()) - 1) < 1e-4
        for row in rows:  # each bar is drawn to scale: its width is its probability's share of the track
            track = row.find_element(By.CLASS_NAME, "bar-track").size["width"]
            bar = row.find_element(By.CLASS_NAME, "bar").size["width"]
            assert track > 100 and abs(bar - probabilities[row.get_attribute("data-label")] * track) <= 2
    assert "2 tweet(s)" in browser.find_element(By.ID, "status").text
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "page.png"))


def test_a_wrong_key_shows_the_servers_error(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    browser.execute_script("localStorage.setItem('doratweet-api-key', 'wrong')")
    browser.get(server + "/")
    wait_for(browser, lambda b: b.find_element(By.ID, "key-field").is_displayed())
    browser.find_element(By.ID, "tweets").send_keys("hello")
    browser.find_element(By.ID, "classify").click()
    status = wait_for(browser, lambda b: "HTTP 401" in b.find_element(By.ID, "status").text and
                      b.find_element(By.ID, "status"))
    assert "API key" in status.text
    browser.execute_script(f"localStorage.setItem('doratweet-api-key', '{API_KEY}')")


def test_the_report_page_shows_the_metrics_table_and_plots(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    browser.execute_script(f"localStorage.setItem('doratweet-api-key', '{API_KEY}')")
    browser.get(server + "/report")
    table = wait_for(browser, lambda b: b.find_elements(By.ID, "metrics-table") and b.find_element(By.ID, "metrics-table"))
    header = [th.text for th in table.find_elements(By.TAG_NAME, "th")]
    assert header[:4] == ["stage", "mode", "n", "macro-F1"]
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert {(r[0], r[1]) for r in rows} == {(s, m) for s in ("before", "after") for m in ("score", "generate")}
    assert all(r[2] == "6" for r in rows)
    images = wait_for(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#plots img")) == 4 and
                      b.find_elements(By.CSS_SELECTOR, "#plots img"))
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i) for i in images)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#confusion table")) == 4


def test_the_classify_page_names_the_model_and_its_test_figures_without_paths(server, browser, tiny_run_dir):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    browser.execute_script(f"localStorage.setItem('doratweet-api-key', '{API_KEY}')")
    browser.get(server + "/")
    model = wait_for(browser, lambda b: "macro-F1" in b.find_element(By.ID, "model").text and
                     b.find_element(By.ID, "model").text)
    assert "adapter run/adapter" in model and "on 6 test tweets" in model
    assert str(tiny_run_dir) not in model and "/tmp/" not in model
