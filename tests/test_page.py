"""The page at `/`, in a real browser: Chromium from the system's packages, driven by Playwright (the PyPI
package, launched with the system browser's path: no browser download), against a real `serve`.

Without Chromium the tests are skipped, except in CI (`CI` set), where `.ci/run` installs it and a missing
browser fails them. With SELFEXTEND_SCREENSHOTS=DIR the reading test leaves its screenshots there (the
README's, docs/page.png and docs/page-reading.png, are made so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.testing import start_server, stop_server

playwright = pytest.importorskip("playwright.sync_api")
LONG_CHARS = 42000  # ~10k tokens of pydoc text: past the bundled model's 8k training context


def chromium() -> str:
    found = os.environ.get("SELFEXTEND_TEST_CHROMIUM") or next(
        (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None
    )
    if found is None:
        message = "no Chromium here (apt-get install chromium, or set SELFEXTEND_TEST_CHROMIUM)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield launched
        launched.close()


def drop(page, name: str, text: str) -> None:
    """Drop a file on the page's drop zone, as a user dragging it from their desktop does."""
    make = "([name, text]) => { const t = new DataTransfer(); t.items.add(new File([text], name)); return t; }"
    transfer = page.evaluate_handle(make, [name, text])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def answers(page) -> list[str]:
    return page.locator("#messages li.assistant .text").all_inner_texts()


def wait_answer(page, count: int, timeout: float = 300_000) -> str:
    """The ``count``-th answer once it is complete (the Send button enabled again)."""
    done = f"document.querySelectorAll('#messages li.assistant').length >= {count}"
    page.wait_for_function(f"{done} && !document.getElementById('send').disabled", timeout=timeout)
    return answers(page)[count - 1]


@pytest.mark.slow
def test_read_a_long_document_ask_and_reopen_it(browser, tmp_path):
    """Drop a ~10k-token document, see the bar move to the end while a second tab chats, ask and see the
    answer stream, then reload, and after a server restart, reopen it from the cache without reading."""
    shots = Path(os.environ.get("SELFEXTEND_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    proc, url = start_server("--cache-dir", str(tmp_path / "cache"), "--parallel", "2")
    try:
        # the page's Content-Security-Policy forbids eval; the test's own waits use it
        context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        page, other = context.new_page(), context.new_page()
        page.goto(url)
        other.goto(url)
        drop(page, "pydoc.txt", pydoc_text()[:LONG_CHARS])
        page.wait_for_selector("#document-panel:not([hidden])")
        facts = page.inner_text("#doc-facts")
        assert "SelfExtend G=" in facts and "KV cache" in facts, facts
        tokens = int(facts.split("Tokens")[1].split()[0].replace(",", ""))
        assert tokens > 8192
        page.click("#doc-read")
        page.wait_for_function("document.getElementById('doc-progress').value > 0", timeout=120_000)
        first = page.eval_on_selector("#doc-progress", "bar => bar.value")

        send(other, "Name three colours.")  # a chat in a second tab while the document is read
        other.wait_for_function("document.querySelector('#messages li.assistant .text')?.textContent.length > 0")
        still = page.eval_on_selector("#doc-progress", "bar => [bar.value, bar.max]")
        assert still[0] < still[1], "the chat's first words waited for the whole reading"
        page.screenshot(path=str(shots / "page-reading.png"))
        assert wait_answer(other, 1).strip()

        page.wait_for_function(
            "document.getElementById('doc-status').textContent.startsWith('Read in')", timeout=600_000
        )
        done = page.eval_on_selector("#doc-progress", "bar => [bar.value, bar.max]")
        assert first < done[0] == done[1] == tokens  # the bar moved, to the end

        send(page, "What is this document about?")
        page.wait_for_function("document.querySelector('#messages li.assistant .text')?.textContent.length > 0")
        growing = len(answers(page)[0])
        answer = wait_answer(page, 1)
        assert answer.strip() and len(answer) >= growing
        page.screenshot(path=str(shots / "page.png"))

        page.reload()
        reopen(page, "Already read.")
    finally:
        stop_server(proc)
    proc, url = start_server("--cache-dir", str(tmp_path / "cache"), "--parallel", "2")
    try:
        page.goto(url)
        reopen(page, "Opened from the disk cache.")
    finally:
        stop_server(proc)
        context.close()


def reopen(page, said: str) -> None:
    """Open the listed document again: it opens at once (memory or disk), no reading."""
    item = page.locator("#documents li").first
    item.wait_for()
    assert "opens at once" in item.inner_text()
    item.click()
    assert page.inner_text("#doc-read") == "Open it"
    page.click("#doc-read")
    page.wait_for_function(f"document.getElementById('doc-status').textContent.startsWith({said!r})", timeout=60_000)


def test_the_page_asks_for_the_key_and_shows_text_not_html(browser):
    """With --api-key the page is served but asks for the key before anything else; a reply is shown as
    text (a model writing markup cannot run script in it)."""
    proc, url = start_server("--api-key", "page-key", "--parallel", "1", "--ctx", "2048")
    try:
        page = browser.new_page(bypass_csp=True)  # the page's CSP forbids eval; the test's own waits use it
        page.goto(url)
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key", "page-key")
        page.click("#key-form button")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        send(page, "Repeat exactly: <img src=x onerror=alert(1)><b>bold</b>")
        wait_answer(page, 1, timeout=120_000)
        assert page.locator("#messages img, #messages b").count() == 0
        user = page.locator("#messages li.user .text").first.inner_text()
        assert "<img src=x" in user  # shown as the text it is
        sizes = sum(len(page.evaluate(f"fetch('/static/{n}').then(r => r.text())")) for n in ("app.js", "style.css"))
        assert sizes + len(page.content()) < 200_000
        page.close()
    finally:
        stop_server(proc)
