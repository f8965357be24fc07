"""The dashboard in a real headless browser (Debian's chromium driven by selenium through
chromium-driver), against the real API over two real ranks (MPI, the default model,
SmolLM2-135M, split by layers) with an API key: the page asks for the key, shows each rank
with its layers, streams a chat answer, and shows model output holding HTML as text.

The output with HTML in it is the model's for real: the request the page sends carries a
JSON schema (the page's "Structured output") whose only value is a string of HTML, so
rank 0's constrained decoding makes the model write exactly that string."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from harness import KEY, ApiServer, RankProcess, mlx_lm_greedy, ring_and_api

WAIT = 60  # s for the page to show what the ring does
LAYERS = 30  # SmolLM2-135M's
ANSWER_TOKENS = 24
HTML_ANSWER = "<script>window.pwned=1</script><img src=x onerror='window.pwned=2'>"
BROWSER_PACKAGES = ["chromium", "chromium-driver"]


def _browser_binaries() -> tuple[str, str]:
    """chromium and chromedriver, installed with apt-get when missing (as root); skips
    the test, saying why, where they cannot be had."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"no chromium/chromedriver, and no apt-get as root to install {BROWSER_PACKAGES}")
        install = ["apt-get", "install", "-y", "--no-install-recommends", *BROWSER_PACKAGES]
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            done = subprocess.run(install, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"apt-get could not install {BROWSER_PACKAGES}: {done.stderr[-500:]}")
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--force-color-profile=srgb"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver named here: selenium must not look for one on the network.
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def served(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, RankProcess]]:
    with ring_and_api(default_model, tmp_path_factory.mktemp("ring") / "spool", ranks=2,
                      api_settings={"served_model_name": "smol"}) as both:
        yield both


def _markdown_text(browser: webdriver.Chrome, text: str) -> str:
    """What the page's Markdown renderer shows of `text` (its marks drawn, not shown)."""
    return browser.execute_async_script("""
        const [text, done] = arguments;
        import('/dashboard/markdown.js').then((m) => {
            const box = document.createElement('div');
            box.append(...m.renderMarkdown(text));
            done(box.textContent);
        });
    """, text)


def _console_errors(browser: webdriver.Chrome) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _send(browser: webdriver.Chrome, message: str, max_tokens: int, schema: str = "") -> str:
    """Chat through the page's form; the answer's text once its statistics show, and how
    many times its text changed on the way (a streamed answer grows)."""
    browser.execute_script("""
        const settings = {temperature: '0', 'max-tokens': arguments[0], schema: arguments[1]};
        for (const [id, value] of Object.entries(settings)) document.getElementById(id).value = value;
        window.answerChanges = 0;
        window.answerWatch?.disconnect();
        window.answerWatch = new MutationObserver(() => {
            const last = [...document.querySelectorAll('#transcript .message.assistant')].pop();
            if (last && last.classList.contains('streaming')) window.answerChanges++;
        });
        window.answerWatch.observe(document.getElementById('transcript'), {childList: true, subtree: true});
    """, str(max_tokens), schema)
    browser.find_element(By.ID, "message").send_keys(message)
    answers = len(browser.find_elements(By.CSS_SELECTOR, "#transcript .message.assistant"))
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, WAIT).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#transcript .message.assistant")) > answers
        and "tokens/s" in b.find_element(By.ID, "chat-stats").text)
    last = browser.find_elements(By.CSS_SELECTOR, "#transcript .message.assistant .body")[-1]
    return last.get_property("textContent")


def test_dashboard_in_a_browser(served: tuple[ApiServer, RankProcess], browser: webdriver.Chrome, default_model: Path,
                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    api, _ = served
    browser.get(f"{api.url}/")
    # The page asks for the key before it calls the API, and keeps it in this tab only.
    dialog = WebDriverWait(browser, WAIT).until(lambda b: b.find_element(By.ID, "key-dialog"))
    WebDriverWait(browser, WAIT).until(lambda b: dialog.get_property("open"))
    browser.find_element(By.ID, "key-input").send_keys(KEY + "\n")
    assert browser.execute_script("return sessionStorage.getItem('mlx-ring-api-key')") == KEY
    assert browser.execute_script("return localStorage.length") == 0

    # One card and one node of the ring per rank, each with its layers.
    WebDriverWait(browser, WAIT).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#ranks .card")) == 2)
    cards = browser.find_elements(By.CSS_SELECTOR, "#ranks .card")
    half = LAYERS // 2
    assert [c.find_element(By.CLASS_NAME, "rank-layers").text for c in cards] == [
        f"layers 0–{half - 1} of {LAYERS}", f"layers {half}–{LAYERS - 1} of {LAYERS}"]
    assert all("up" in c.find_element(By.CLASS_NAME, "state").text for c in cards)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#ring .node.alive")) == 2
    assert browser.find_element(By.ID, "status").text == "serving"
    assert browser.find_element(By.ID, "summary").text.startswith("smol · pipeline on 2 rank(s)")

    # A chat message gets a streamed answer: the model's greedy output, as mlx-lm gives it.
    message = "What does a <b>lighthouse</b> keeper do?"
    answer = _send(browser, message, ANSWER_TOKENS)
    reference = mlx_lm_greedy(default_model, [{"role": "user", "content": message}], ANSWER_TOKENS).text
    assert answer == _markdown_text(browser, reference) and len(answer.split()) > 5
    assert browser.execute_script("return window.answerChanges") > 1
    user = browser.find_elements(By.CSS_SELECTOR, "#transcript .message.user .body")[-1]
    assert user.get_property("textContent") == message and not user.find_elements(By.TAG_NAME, "b")

    # Model output holding HTML is shown as text: nothing of it runs or becomes an element.
    answer = _send(browser, "Write some HTML.", 120, json.dumps({"enum": [HTML_ANSWER]}))
    assert answer == json.dumps(HTML_ANSWER)
    assert browser.execute_script("return document.querySelectorAll('#transcript script, #transcript img').length") == 0
    assert browser.execute_script("return window.pwned") is None

    # The live figures have seen the two requests.
    WebDriverWait(browser, WAIT).until(
        lambda b: b.find_element(By.CSS_SELECTOR, "#figures .figure:nth-child(5) .figure-value").text.endswith("/2"))
    assert not _console_errors(browser)
    screenshot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(screenshot))
    with capsys.disabled():
        print(f"\ndashboard screenshot: {screenshot}")

    # On a phone's width nothing runs off the side, and dark mode is dark.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert sum(map(int, background[background.index("(") + 1:-1].split(",")[:3])) < 3 * 64, background
    phone = tmp_path / "dashboard-phone-dark.png"
    browser.save_screenshot(str(phone))
    with capsys.disabled():
        print(f"dashboard screenshot (phone, dark): {phone}")
    assert not _console_errors(browser)


def test_markdown_is_drawn_as_elements_and_text(served: tuple[ApiServer, RankProcess],
                                                browser: webdriver.Chrome) -> None:
    """The page's renderer makes elements for Markdown's marks and text nodes of the rest:
    HTML in the text stays text, and a link keeps only an http(s) or mailto address."""
    api, _ = served
    browser.get(f"{api.url}/")
    markdown = ("## Lights\n**Bold** and *soft* `<code>` [docs](https://example.org/a) "
                "[bad](javascript:alert(1)) <img src=x onerror=alert(1)>\n\n- one\n- two\n\n"
                "```html\n<script>alert(1)</script>\n```")
    html = browser.execute_async_script("""
        const [text, done] = arguments;
        import('/dashboard/markdown.js').then((m) => {
            const box = document.createElement('div');
            box.append(...m.renderMarkdown(text));
            done(box.innerHTML);
        });
    """, markdown)
    assert html == (
        '<h4>Lights</h4><p><strong>Bold</strong> and <em>soft</em> <code>&lt;code&gt;</code> '
        '<a href="https://example.org/a" rel="noopener noreferrer" target="_blank">docs</a> '
        '[bad](javascript:alert(1)) &lt;img src=x onerror=alert(1)&gt;</p><ul><li>one</li><li>two</li></ul>'
        '<pre><code data-language="html">&lt;script&gt;alert(1)&lt;/script&gt;</code></pre>')
