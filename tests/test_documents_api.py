"""The documents API against a real server: one reading of a document however many wait on it, listings
from kept facts, and uploads that are awkward (a question mark in the text, a stored document an older
version left) listed without a 500."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.testing import start_server, stop_server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    proc, url = start_server("--parallel", "2", "--ctx", "4096", "--batch", "128", "--cache-dir", str(cache))
    yield url, cache / "documents"
    stop_server(proc)


def put(url: str, data: bytes, name: str | None = "doc.txt", kind: str = "text/plain") -> httpx.Response:
    params = {"name": name} if name else {}
    return httpx.post(f"{url}/v1/documents", params=params, content=data, headers={"Content-Type": kind}, timeout=120)


def listing(url: str) -> list[dict]:
    reply = httpx.get(f"{url}/v1/documents", timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]


def test_a_text_holding_qas_question_mark_uploads_lists_and_opens(served):
    url, folder = served
    marked = ("Some words. " * 800 + "\x00QUESTION\x00 more words.").encode()
    card = put(url, marked, "marked.txt")
    assert card.status_code == 200 and card.json()["tokens"] > 100, card.text
    assert httpx.get(f"{url}/v1/documents/{card.json()['id']}").status_code == 200
    # as an older version stored it, mark and all: listed and opened all the same
    old = "b" * 32
    (folder / f"{old}.txt").write_text("Stored before. \x00QUESTION\x00 Still text.")
    stored = {"id": old, "name": "old.txt", "kind": "text", "bytes": 40, "chars": 40, "added": time.time()}
    (folder / f"{old}.json").write_text(json.dumps(stored))
    cards = {c["id"]: c for c in listing(url)}
    assert cards[old]["tokens"] > 5 and cards[card.json()["id"]]["fits"]
    assert httpx.get(f"{url}/v1/documents/{old}").status_code == 200


def test_listings_come_from_kept_facts(served):
    url, folder = served
    card = put(url, pydoc_text()[:3000].encode(), "facts.txt").json()
    kept = json.loads((folder / f"{card['id']}.json").read_text())
    ((key, facts),) = kept["facts"].items()
    assert (
        facts["tokens"] == card["tokens"] and (folder / f"{card['id']}.{key}.tok").stat().st_size == 4 * card["tokens"]
    )
    listed = next(c for c in listing(url) if c["id"] == card["id"])
    assert listed["tokens"] == card["tokens"] and listed["plan"] == card["plan"] and "facts" not in listed


def test_a_multipart_form_and_a_nameless_pdf_are_read_as_what_they_are(served):
    from selfextend_local.testing import tiny_pdf

    url, _ = served
    form = httpx.post(f"{url}/v1/documents", files={"file": ("notes.md", b"# Notes\n\nThe key is 4127.")}, timeout=60)
    assert form.status_code == 200 and form.json()["name"] == "notes.md" and form.json()["chars"] == 25, form.text
    pdf = put(url, tiny_pdf("The harbour opens at dawn."), None, "application/pdf")
    assert pdf.status_code == 200 and pdf.json()["kind"] == "pdf", pdf.text
    odd = put(url, tiny_pdf("Glyphs", to_unicode="D800"), "odd.pdf", "application/pdf")
    assert odd.status_code in (200, 400), odd.text
    bad = put(url, b"caf\xe9 au lait", "menu.txt")
    assert bad.status_code == 400 and "menu.txt" in bad.json()["error"]["message"] and "/tmp" not in bad.text
    for reply in (httpx.get(f"{url}/v1/documents/{'f' * 10_000}"), put(url, b"\xff\xfe", "n" * 10_000 + ".txt")):
        assert reply.status_code in (400, 404) and len(reply.text) < 600, reply.text[:200]


def test_concurrent_uploads_of_one_document_and_listing_beside_deletion(served):
    url, _ = served
    data = pydoc_text()[5000:9000].encode()
    answers: list[httpx.Response] = []

    def client() -> None:
        for _ in range(5):
            answers.append(put(url, data, "same.txt"))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    assert {a.status_code for a in answers} == {200} and len({a.json()["id"] for a in answers}) == 1
    ids = [put(url, f"Short document {i}.".encode(), f"s{i}.txt").json()["id"] for i in range(8)]
    statuses, stop = [], threading.Event()

    def lister() -> None:
        while not stop.is_set():
            statuses.append(httpx.get(f"{url}/v1/documents", timeout=60).status_code)

    thread = threading.Thread(target=lister)
    thread.start()
    for ident in ids:
        assert httpx.delete(f"{url}/v1/documents/{ident}").status_code == 200
    stop.set()
    thread.join()
    assert statuses and set(statuses) == {200}


def follow(url: str, ident: str, events: list[dict], joined: threading.Event, leave: threading.Event | None = None):
    """Follow a reading's events into ``events`` (``joined`` set at the first); go away once ``leave`` is set."""
    with httpx.stream("POST", f"{url}/v1/documents/{ident}/read", json={}, timeout=300) as reply:
        for line in reply.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                events.append(json.loads(line[5:]))
                joined.set()
                if leave is not None and leave.is_set():
                    return


@pytest.mark.slow
def test_one_reading_for_every_tab_and_question_on_a_document(served):
    """A document being read: a second follower, a question, and the card all see that one reading; the
    first follower leaving does not stop it; the question waits for it and uses it (no second reading in
    another slot), its stream reporting the reading's progress."""
    url, _ = served
    card = put(url, pydoc_text()[20000:24500].encode(), "shared.txt").json()  # ~1.1k tokens
    ident, total = card["id"], card["tokens"]
    first, second, began, joined = [], [], threading.Event(), threading.Event()
    leaving = threading.Thread(target=follow, args=(url, ident, first, began, joined))
    staying = threading.Thread(target=follow, args=(url, ident, second, joined))
    leaving.start()
    assert began.wait(120)
    staying.start()  # once it follows too, the first goes away at its next event
    shown = httpx.get(f"{url}/v1/documents/{ident}").json()["reading"]
    assert shown["state"] in ("waiting", "reading") and shown["total"] == total and shown["done"] < total, shown
    assert next(c for c in listing(url) if c["id"] == ident)["reading"]["total"] == total
    ask = {"document": ident, "messages": [{"role": "user", "content": "What is this about?"}], "max_tokens": 8}
    ask.update(temperature=0, stream=True, return_progress=True)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=ask, timeout=300) as reply:
        busy = httpx.get(f"{url}/v1/status").json()["busy_slots"]
        events = [json.loads(line[5:]) for line in reply.iter_lines() if line.startswith("data: {")]
    leaving.join(60)
    staying.join(300)
    assert busy == 1, "the question read the document again in a second slot"
    assert second[-1]["state"] == "ready", second[-1]  # the first follower left; the reading went on
    assert any("prompt_progress" in e for e in events) and not any("error" in e for e in events), events[-1]
    usage = httpx.post(f"{url}/v1/chat/completions", json={**ask, "stream": False}, timeout=300).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= total  # the document as the reading left it
    assert httpx.get(f"{url}/v1/documents/{ident}").json()["reading"] is None


def test_a_reading_left_and_followed_again_at_once_is_read_for_the_new_follower(served):
    """The last follower leaves, and another follows before the cancelled reading is over: the newcomer
    gets a reading of its own to the end (it was handed the dying one: "stopped after 256 of 443 tokens")."""
    url, _ = served
    ident = put(url, pydoc_text()[40000:41600].encode(), "again.txt").json()["id"]
    leave = threading.Event()
    leave.set()
    first: list[dict] = []
    follow(url, ident, first, threading.Event(), leave)  # gone at its first event
    second: list[dict] = []
    follow(url, ident, second, threading.Event())
    assert second[-1]["state"] == "ready", second[-1]
