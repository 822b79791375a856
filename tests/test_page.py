"""The page at `/`, in a real browser: Chromium from the system's packages, driven by Playwright (the PyPI
package, launched with the system browser's path: no browser download), against a real `serve`.

Without Chromium the tests are skipped, except in CI (`CI` set), where `.ci/run` installs it and a missing
browser fails them. With SELFEXTEND_SCREENSHOTS=DIR the reading test leaves its screenshots there (the
README's, docs/page.png and docs/page-reading.png, are made so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.testing import start_server, stop_server

playwright = pytest.importorskip("playwright.sync_api")
LONG_CHARS = 35200  # ~8.35k tokens of pydoc text: past the bundled model's 8k training context


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
        # the second tab's chat is short: the test waits on the reading, not on a chat beside it (issue 42.1)
        page.evaluate("([key, value]) => localStorage.setItem(key, value)", [STORE, json.dumps(QUICK)])
        page.reload()  # the answer about the document is short too: up to 256 tokens at depth 8k take long
        other.goto(url)
        drop(page, "pydoc.txt", pydoc_text()[:LONG_CHARS])
        page.wait_for_selector("#document-panel:not([hidden])")
        facts = page.inner_text("#doc-facts")
        assert "SelfExtend G=" in facts and "KV cache" in facts, facts
        tokens = int(facts.split("Tokens")[1].split()[0].replace(",", ""))
        assert tokens > 8192  # a dropped document is read at once, no button to press
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

        page.reload()  # the page opens the document it had open again, from the slot that holds it
        wait_status(page, "Already read.")
    finally:
        stop_server(proc)
    proc, url = start_server("--cache-dir", str(tmp_path / "cache"), "--parallel", "2")
    try:
        page.goto(url)  # another port: another origin, nothing kept in the browser, the list on the server
        page.locator("#documents li .pick").first.click()  # one click
        wait_status(page, "Opened from the disk cache.")
    finally:
        stop_server(proc)
        context.close()


def wait_status(page, said: str | tuple[str, ...], timeout: float = 60_000) -> None:
    """Wait until the document's status begins with ``said`` (or one of them)."""
    begins = " || ".join(f"text.startsWith({s!r})" for s in ([said] if isinstance(said, str) else said))
    try:
        page.wait_for_function(
            f"(() => {{ const text = document.getElementById('doc-status').textContent; return {begins}; }})()",
            timeout=timeout,
        )
    except playwright.TimeoutError:
        raise AssertionError(f"the status says {page.inner_text('#doc-status')!r}, not {said!r}") from None


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


# -- the page's items (issue 42), each at a desktop's size and a phone's, against one server --------
# Each test goes through its item at one size and checks it again at the other in the same page (the
# viewport changed), so the model's work is done once a test.

SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
STORE = "selfextend-page"  # the page's localStorage key
OPENED = ("Already read.", "Opened from the disk cache.")  # a document read before: a slot holds it, or the disk
QUICK = {"settings": {"max-tokens": "24", "temperature": "0"}}  # short answers: the tests wait less
SEEN = """() => {
    // What the page showed at any moment, so a test cannot miss a state that lasted a second.
    const seen = window.seen = { left: [], listed: false };
    new MutationObserver((records) => {
        for (const r of records) {
            const where = r.target.nodeType === 1 ? r.target : r.target.parentElement;
            for (const n of r.addedNodes) {
                if (where && where.id === 'doc-status' && / left$/.test(n.textContent)) seen.left.push(n.textContent);
            }
        }
        if (document.querySelector('#documents li.reading')) seen.listed = true;
    }).observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true });
}"""
TAPPED = """(id) => {
    // the element a tap on the middle of #id reaches
    const b = document.getElementById(id).getBoundingClientRect();
    return document.elementFromPoint(b.x + b.width / 2, b.y + b.height / 2).id;
}"""
ON_SCREEN = """() => {
    const b = document.getElementById('input').getBoundingClientRect();
    return b.top >= 0 && b.bottom <= window.innerHeight;
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = start_server("--cache-dir", str(tmp_path_factory.mktemp("cache")), "--parallel", "2", "--ctx", "8192")
    yield url
    stop_server(proc)


def visit(browser, url: str, size: str = "desktop", kept: dict | None = QUICK):
    """A fresh browser (nothing stored) at ``size`` on the page, with ``kept`` as the page's stored state."""
    # the page's Content-Security-Policy forbids eval; the test's own waits use it. A touch screen, for taps.
    context = browser.new_context(viewport=SIZES[size], bypass_csp=True, has_touch=True)
    page = context.new_page()
    page.goto(url)
    if kept is not None:
        page.evaluate("([key, value]) => localStorage.setItem(key, value)", [STORE, json.dumps(kept)])
    reload(page)
    return page


def reload(page) -> None:
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent.length > 0")


def shot(page, name: str) -> None:
    """A screenshot under SELFEXTEND_SCREENSHOTS, when it is set."""
    if folder := os.environ.get("SELFEXTEND_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"))


def text_of(part: int, chars: int = 1200) -> str:
    """A slice of pydoc text no other test reads (a few hundred tokens at 1,200 characters)."""
    return pydoc_text()[part * 20_000 : part * 20_000 + chars]


def drop_and_read(page, name: str, text: str) -> None:
    drop(page, name, text)
    wait_status(page, "Read in", timeout=120_000)


def kept_state(page) -> dict:
    return page.evaluate(f"JSON.parse(localStorage.getItem({STORE!r}) || '{{}}')")


def fits_the_width(page) -> bool:
    """Neither the page nor its header is wider than the screen (no sideways scrolling)."""
    wide = page.evaluate("[document.documentElement.scrollWidth, document.querySelector('header').scrollWidth]")
    return max(wide) <= page.viewport_size["width"]


def test_state_is_kept_across_a_reload(browser, server):
    """42.2: settings, the chat and the open document survive a reload (at a desktop's size, then a
    phone's); a listed document opens again in one tap."""
    page = visit(browser, server, kept=None)
    page.click("#open-settings")
    page.fill("#temperature", "0.3")
    page.fill("#max-tokens", "16")
    page.click("#settings-form button")
    send(page, "Say hello.")
    answer = wait_answer(page, 1, timeout=120_000)
    drop_and_read(page, "kept.txt", text_of(1))
    for size in SIZES:
        page.set_viewport_size(SIZES[size])
        reload(page)
        wait_status(page, OPENED)  # the open document, opened again (a slot or the disk cache holds it)
        assert page.input_value("#temperature") == "0.3" and page.input_value("#max-tokens") == "16"
        assert page.inner_text("#doc-name") == "kept.txt"
        assert page.get_attribute("#input", "placeholder") == "Ask about kept.txt"
        shot(page, f"kept-{size}")
    page.tap("#doc-close")
    assert page.locator("#messages li.user .text").all_inner_texts() == ["Say hello."]
    assert answers(page) == [answer]
    page.locator("#documents li", has_text="kept.txt").locator(".pick").tap()  # one tap opens it
    wait_status(page, OPENED)
    page.context.close()


@pytest.mark.slow
def test_questions_go_to_the_document_shown(browser, server):
    """42.3: a dropped document is read at once, with the focus in the input; a second one (dropped at a
    phone's size) shows its own (empty) questions, not the first's, and the input names it; the first's
    questions come back with it."""
    page = visit(browser, server)
    assert "read as soon as it arrives" in page.inner_text("#drop-help")
    drop_and_read(page, "first.txt", text_of(3))
    assert page.get_attribute("#input", "placeholder") == "Ask about first.txt"
    assert page.evaluate("document.activeElement.id") == "input"  # no Tab to press after the upload
    send(page, "What is this about?")
    wait_answer(page, 1, timeout=120_000)
    shot(page, "first-document-desktop")

    page.set_viewport_size(SIZES["phone"])
    drop(page, "second.txt", text_of(5))
    page.wait_for_function("document.getElementById('doc-name').textContent === 'second.txt'")
    assert page.locator("#messages li").count() == 0
    assert "second.txt" in page.get_attribute("#input", "placeholder")
    assert "second.txt" in page.inner_text("#input-label")
    wait_status(page, "Read in", timeout=120_000)
    assert page.get_attribute("#input", "placeholder") == "Ask about second.txt"
    shot(page, "second-document-phone")
    page.locator("#documents li", has_text="first.txt").locator(".pick").tap()
    wait_status(page, OPENED)
    assert page.locator("#messages li.user .text").all_inner_texts() == ["What is this about?"]
    assert page.get_attribute("#input", "placeholder") == "Ask about first.txt"
    page.context.close()


@pytest.mark.slow
def test_a_reading_shows_its_time_left_in_every_tab(browser, server):
    """42.4 and 42.8: while a document is read in a tab at a desktop's size, its card shows the time left
    from the server's events, and the documents list shows the reading, in that tab and in another at a
    phone's size; after it, the card says how long it took."""
    page = visit(browser, server)
    other = page.context.new_page()
    other.set_viewport_size(SIZES["phone"])
    other.goto(server)
    other.wait_for_function("document.getElementById('model').textContent.length > 0")
    page.evaluate(SEEN)
    other.evaluate(SEEN)
    drop(page, "long.txt", text_of(7, chars=6400))  # ~1,600 tokens: chunks enough for an estimate midway
    other.wait_for_function("window.seen.listed", timeout=120_000)
    shot(other, "reading-other-tab-phone")
    page.wait_for_function("window.seen.left.length > 0", timeout=120_000)
    shot(page, "reading-desktop")
    wait_status(page, "Read in", timeout=120_000)
    assert page.evaluate("window.seen.listed")
    said = [re.match(r"([\d,]+) of ([\d,]+) tokens .* about \d+ (s|min) left", t) for t in page.evaluate("seen.left")]
    assert any(m and int(m[1].replace(",", "")) < int(m[2].replace(",", "")) for m in said), said
    assert page.inner_text("#doc-time").startswith("read in"), page.inner_text("#doc-time")
    assert "unknown" not in page.inner_text("#doc-facts")
    other.wait_for_function("!document.querySelector('#documents li.reading')", timeout=10_000)
    page.context.close()


@pytest.mark.slow
def test_the_phone_layout_keeps_everything_in_reach(browser, server):
    """42.5: at 390x844 the header wraps within the width, Settings takes a tap (New conversation does not
    cover it), and the input stays on screen while an answer streams below a long conversation; the
    same holds at a desktop's size."""
    past = [{"role": r, "content": f"Earlier message {i}. " * 6} for i in range(8) for r in ("user", "assistant")]
    page = visit(browser, server, "phone", kept={"settings": {"max-tokens": "40"}, "threads": {"chat": past}})
    assert fits_the_width(page)
    assert page.evaluate(TAPPED, "open-settings") == "open-settings"
    assert page.evaluate(TAPPED, "new-chat") == "new-chat"
    page.tap("#open-settings")
    page.wait_for_selector("#settings[open]")
    page.tap("#settings-form button")

    send(page, "Write a long story about a lighthouse.")
    page.wait_for_function("document.querySelectorAll('#messages li.assistant .text')[8]?.textContent.length > 0")
    assert page.evaluate(ON_SCREEN), "the input left the screen while the answer streamed"
    shot(page, "streaming-phone")
    wait_answer(page, 9, timeout=120_000)
    assert page.evaluate(ON_SCREEN) and fits_the_width(page)
    page.set_viewport_size(SIZES["desktop"])
    assert page.evaluate(ON_SCREEN) and fits_the_width(page)
    assert page.evaluate(TAPPED, "open-settings") == "open-settings"
    shot(page, "conversation-desktop")
    page.context.close()


MARKDOWN = """Here is **bold**, *italic* and `code`,
[a link](https://example.com/a) and [a bad one](javascript:alert(1)).

- one
- two

1. first
2. second

```
<img src=x onerror=alert(1)>
```
<script>alert(2)</script> stays text"""


def test_answers_are_markdown_with_copy_tokens_and_speed(browser, server):
    """42.9: an answer drawn from Markdown (no HTML from the model's text, links http(s) only) with a copy
    button, tokens and tok/s; a favicon and no failed request; Ctrl+Shift+O clears the conversation."""
    shown = [{"role": "user", "content": "Show me"}, {"role": "assistant", "content": MARKDOWN}]
    page = visit(browser, server, kept={**QUICK, "threads": {"chat": shown}})
    failed = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    reload(page)
    answer = page.locator("#messages li.assistant .text").first
    assert answer.locator("strong").inner_text() == "bold" and answer.locator("em").inner_text() == "italic"
    assert answer.locator("ul li").all_inner_texts() == ["one", "two"]
    assert answer.locator("ol li").all_inner_texts() == ["first", "second"]
    assert answer.locator("pre code").inner_text() == "<img src=x onerror=alert(1)>"
    assert [a.get_attribute("href") for a in answer.locator("a").all()] == ["https://example.com/a"]
    assert page.locator("#messages img, #messages script").count() == 0
    assert "<script>alert(2)</script> stays text" in answer.inner_text()
    assert page.get_attribute("link[rel=icon]", "href").startswith("data:image/svg+xml")

    send(page, "Name two fruits.")
    wait_answer(page, 2, timeout=120_000)
    meta = page.locator("#messages li.assistant .meta").nth(1).inner_text()
    assert re.fullmatch(r"\d+ tokens · \d+\.\d tok/s", meta), meta
    shot(page, "markdown-desktop")
    page.set_viewport_size(SIZES["phone"])
    assert fits_the_width(page)
    shot(page, "markdown-phone")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.locator("#messages li.assistant .copy").first.tap()
    assert page.evaluate("navigator.clipboard.readText()") == MARKDOWN
    page.keyboard.press("Control+Shift+O")
    assert page.locator("#messages li").count() == 0 and "chat" not in kept_state(page).get("threads", {})
    assert failed == []
    page.context.close()


def test_a_document_is_deleted_from_the_page(browser, server):
    """42.9: Delete on a listed document removes it from the server and the page, at either size."""
    page = visit(browser, server)
    page.on("dialog", lambda dialog: dialog.accept())
    for n, size in enumerate(SIZES):
        page.set_viewport_size(SIZES[size])
        name = f"doomed-{size}.txt"
        drop_and_read(page, name, text_of(9 + n, chars=400))
        page.locator("#documents li", has_text=name).locator(".delete").tap()
        page.wait_for_function(f"!document.getElementById('documents').textContent.includes({name!r})")
        assert page.is_hidden("#document-panel") and page.inner_text("#status") == f"Deleted {name}."
        listed = page.evaluate("fetch('/v1/documents').then(r => r.json())")["data"]
        assert name not in [card["name"] for card in listed]
    page.context.close()


def test_the_page_says_which_model_answers(browser, server):
    """42.10: the model's name on the page, and for the bundled demo model a note on serving a better one,
    within a phone's width too; it stays hidden once hidden."""
    page = visit(browser, server, kept=None)
    for size in SIZES:
        page.set_viewport_size(SIZES[size])
        assert page.inner_text("#model") == "Answers from SmolLM2-135M-Instruct.Q4_1"
        note = page.inner_text("#model-note")
        assert "135M demo model" in note and "selfextend-local serve --model mistral-7b-instruct" in note
        assert fits_the_width(page)
        shot(page, f"model-note-{size}")
    page.tap("#model-note-hide")
    reload(page)
    assert page.is_hidden("#model-note")
    page.context.close()
