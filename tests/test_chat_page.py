"""The chat page `elutq serve` answers at ``/``, in a real headless browser (Debian's chromium and
chromedriver, driven by selenium; ``scripts/test.sh`` installs them): the model card, a streamed reply equal to
the API's own, tokens/s, code blocks rendered, the Stop button cancelling a reply on the server, and the API
key asked for when the server has one."""

from __future__ import annotations

import re
import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_server import NAME, Server, checkpoint  # noqa: E402, F401 (checkpoint: a fixture)

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    not (CHROMEDRIVER and CHROMIUM), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"
)


@pytest.fixture(scope="module")
def server(checkpoint):  # noqa: F811
    srv = Server(checkpoint, max_batch=2, max_queue=4)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _ask(browser, text: str, max_tokens: int, temperature: float = 0.0) -> None:
    for field, value in (("max", max_tokens), ("temp", temperature)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    browser.find_element(By.ID, "msg").send_keys(text)
    browser.find_element(By.ID, "send").click()


def test_page_streams_a_reply_equal_to_the_api(server, browser, tmp_path):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == NAME)
    assert "3-bit g32 rtn" in browser.find_element(By.ID, "info").text
    _ask(browser, "The quick brown", 12)
    done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant.done"))[-1]
    reply = browser.execute_script("return history[history.length - 1].content")  # exactly what streamed in
    want = server.client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "The quick brown"}], max_tokens=12, temperature=0
    )
    assert reply == want.choices[0].message.content and reply
    meta = done.find_element(By.CLASS_NAME, "meta").text
    assert re.fullmatch(rf"{want.usage.completion_tokens} tokens · [\d.]+ tokens/s · [\d.]+ s", meta), meta
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 1000


def test_code_blocks_are_rendered_and_text_escaped(server, browser):
    browser.get(server.url + "/")
    html = browser.execute_script("return render('see `x` and\\n```python\\nif a < b:\\n    pass\\n```\\n<b>hi</b>')")
    assert '<pre><code data-lang="python">if a &lt; b:\n    pass</code></pre>' in html
    assert "<code>x</code>" in html and "&lt;b&gt;hi&lt;/b&gt;" in html and "<b>" not in html


def test_stop_cancels_the_reply_on_the_server(server, browser, monkeypatch):
    def slowed(real):  # a decode step slow enough to press Stop in the middle of a reply
        def slow(*a, **kw):
            time.sleep(0.1)
            return real(*a, **kw)

        return slow

    for name in ("forward_batch", "forward"):
        monkeypatch.setattr(server.model, name, slowed(getattr(server.model, name)))
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == NAME)
    _ask(browser, "Tell me", 50)
    wait.until(lambda d: d.find_element(By.ID, "stop").is_enabled())
    time.sleep(0.5)
    steps = server.engine.stats()["steps"]
    browser.find_element(By.ID, "stop").click()
    stopped = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant.stopped"))[-1]
    assert stopped.find_element(By.CLASS_NAME, "meta").text == "stopped"
    deadline = time.time() + 20
    while server.engine.stats()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.stats()["running"] == 0
    assert server.engine.stats()["steps"] - steps < 45  # cancelled well before its 50 tokens


def test_page_asks_for_the_api_key(checkpoint, browser):  # noqa: F811
    srv = Server(checkpoint, app_kw={"api_key": "s3cret"}, max_batch=1, max_queue=2)
    try:
        browser.get(srv.url + "/")  # the page itself needs no key; /v1/models does: the page asks for it
        alert = WebDriverWait(browser, 60).until(expected_conditions.alert_is_present())
        assert "API key" in alert.text
        alert.send_keys("s3cret")
        alert.accept()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "model").text == NAME)
        assert browser.execute_script("return sessionStorage.getItem('elutq-api-key')") == "s3cret"
    finally:
        srv.stop()
