"""The chat page that `elm-mlx serve` serves at /, in headless Chromium: a message is
sent and a streamed reply appears. The screenshot is kept in tests/artifacts/."""

import tempfile
from pathlib import Path

import pytest
from serving import running_server

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"
# Debian's Chromium headless, offline and quiet: no sandbox (root), no GPU, no first-run or
# background traffic, no host but loopback resolves, and a profile of its own.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1000,700",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"]


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="elm-mlx-chromium-") as profile:
        for flag in FLAGS + [f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)  # no driver download
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def url(tmp_path_factory, instruct_folder):
    folder = instruct_folder
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with running_server(folder, log, "--max-tokens", "24", "--temp", "0") as url:  # greedy: no early EOS
        yield url


def test_a_message_gets_a_streamed_reply(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "OpenELM-270M-Instruct")
    browser.find_element(By.ID, "input").send_keys("Hello, who are you?")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == ["Hello, who are you?"]
    reply = browser.find_element(By.CSS_SELECTOR, ".assistant")
    # The text arrived as many server-sent events, each appended as it came.
    assert int(reply.get_attribute("data-chunks")) > 5 and reply.text.strip()
    assert "24 tokens" in browser.find_element(By.CSS_SELECTOR, ".note").text
    assert shot.stat().st_size > 0


def test_settings_set_temperature_and_max_tokens_and_the_note_shows_tok_s(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "OpenELM-270M-Instruct")
    browser.find_element(By.CSS_SELECTOR, "#settings-panel summary").click()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max-tokens").send_keys("7")
    browser.find_element(By.ID, "input").send_keys("Hello")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
    note = browser.find_element(By.CSS_SELECTOR, ".note").text
    assert "7 tokens, " in note and " tok/s" in note, note  # the server's --max-tokens is 24


def test_the_page_has_an_icon(url):
    import urllib.request

    with urllib.request.urlopen(url + "/favicon.ico", timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("image/svg+xml") and b"<svg" in r.read()


def test_an_api_key_is_asked_for_in_the_page_not_in_a_modal_prompt(browser, tmp_path, instruct_folder):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running_server(instruct_folder, tmp_path / "serve.log", "--max-tokens", "5", "--api-key", "s3cret") as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "API key needed")
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018  (a window.prompt would block a headless browser)
        browser.find_element(By.ID, "input").send_keys("Hello")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".note.error"))
        assert "needs an API key" in browser.find_element(By.CSS_SELECTOR, ".note.error").text
        key = browser.find_element(By.ID, "key")
        assert key.is_displayed() and browser.switch_to.active_element == key  # Settings opened at the key
        key.send_keys("wrong")
        key.send_keys("\t")  # change event
        browser.find_element(By.ID, "input").send_keys("Hello")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".note.error")) == 2)
        assert "wrong" in browser.find_elements(By.CSS_SELECTOR, ".note.error")[-1].text
        key.clear()
        key.send_keys("s3cret\t")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "OpenELM-270M-Instruct")
        browser.find_element(By.ID, "input").send_keys("Hello")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        assert "5 tokens" in browser.find_elements(By.CSS_SELECTOR, ".note")[-1].text
