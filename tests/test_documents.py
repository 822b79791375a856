"""Reading documents, and the ingested-document cache's integrity and eviction (no model needed)."""

from __future__ import annotations

import sys

import pytest

from selfextend_local.engine.errors import BadInputError
from selfextend_local.engine.kvcache import STATE_MAGIC, KVCache
from selfextend_local.tasks.documents import read_document


def test_text_and_markdown(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\nSome *text*.")
    assert "Some *text*." in read_document(tmp_path / "a.md")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "document not found"),
        ("bin.txt", b"\x00\x01\x02abc", "binary"),
        ("empty.txt", b"  \n", "is empty"),
        ("latin.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_documents(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadInputError, match=message):
        read_document(path)


def test_directory_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="is a directory"):
        read_document(tmp_path)


def test_html_text_without_scripts(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<html><script>var x=1;</script><body><p>The key is 4127.</p></body></html>")
    text = read_document(page)
    assert "The key is 4127." in text and "var x" not in text


def test_html_without_the_optional_library(tmp_path, monkeypatch):
    page = tmp_path / "p.html"
    page.write_text("<p>hi</p>")
    monkeypatch.setitem(sys.modules, "bs4", None)
    with pytest.raises(
        BadInputError, match=r"reading HTML needs beautifulsoup4: pip install 'selfextend-local\[docs\]'"
    ):
        read_document(page)


def test_pdf_text(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure()
    fig.text(0.1, 0.5, "The harbour opens at dawn.")
    matplotlib.rcParams["pdf.fonttype"] = 42
    fig.savefig(tmp_path / "d.pdf")
    assert "harbour opens at dawn" in read_document(tmp_path / "d.pdf")


IDENTITY = {"model": "m.gguf", "document": "abc", "group": 4}


def put(cache, identity, state: bytes, schedule_state=None, n_tokens=3):
    """An entry whose llama.cpp part is ``state`` after llama.cpp's magic (as llama.cpp writes its file)."""
    write = lambda path: path.write_bytes(STATE_MAGIC + state)  # noqa: E731
    return cache.put(identity, write, n_tokens, schedule_state or {}, {"model_name": "m"})


def get(cache, identity):
    """(header, the llama.cpp part's first bytes) of the verified entry, or None."""
    with cache.open(identity) as entry:
        if entry is None:
            return None
        with open(entry.state_path, "rb") as f:
            return entry.meta, f.read()


def test_cache_round_trip(tmp_path):
    cache = KVCache(tmp_path)
    put(cache, IDENTITY, b"state-bytes", {"n_tokens": 3})
    meta, data = get(cache, IDENTITY)
    assert (
        data.startswith(STATE_MAGIC + b"state-bytes")
        and meta["schedule_state"] == {"n_tokens": 3}
        and meta["n_tokens"] == 3
    )
    assert get(cache, {**IDENTITY, "group": 8}) is None


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_entry_is_dropped(tmp_path, damage):
    cache = KVCache(tmp_path)
    path = put(cache, IDENTITY, b"x" * 1000)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[500] ^= 0xFF
    else:
        data = data[:-100]  # still llama.cpp's file at the start: ours, cut short
    path.write_bytes(bytes(data))
    assert get(cache, IDENTITY) is None
    assert not path.exists() and any("damaged" in w for w in cache.warnings)


def test_a_file_the_cache_did_not_write_is_left_alone(tmp_path):
    cache = KVCache(tmp_path)
    path = tmp_path / f"{cache.key(IDENTITY)}.kv"
    path.write_bytes(b"hello")  # named like an entry, but neither llama.cpp's file nor our trailer
    assert get(cache, IDENTITY) is None
    assert path.read_bytes() == b"hello" and any("left it alone" in w for w in cache.warnings)
    assert cache.clear() == 0 and path.exists()


def test_mismatched_entry_is_dropped(tmp_path):
    cache = KVCache(tmp_path)
    other = {**IDENTITY, "document": "zzz"}
    path = put(cache, other, b"y")
    path.rename(tmp_path / f"{cache.key(IDENTITY)}.kv")  # right name, wrong contents
    assert get(cache, IDENTITY) is None
    assert not (tmp_path / f"{cache.key(IDENTITY)}.kv").exists()


def test_least_recently_used_entries_go_first(tmp_path):
    import os
    import time

    cache = KVCache(tmp_path, limit=2800)
    ids = [{**IDENTITY, "document": str(i)} for i in range(3)]
    for i, ident in enumerate(ids[:2]):
        path = put(cache, ident, b"z" * 1000)
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
    assert get(cache, ids[0]) is not None  # touch the older one: now the newer one is least recent
    put(cache, ids[2], b"z" * 1000)
    assert get(cache, ids[0]) is not None and get(cache, ids[2]) is not None
    assert get(cache, ids[1]) is None
    assert cache.clear() == 2


def test_every_byte_of_an_entry_is_checked(tmp_path):
    """A flipped bit anywhere, the JSON header and its schedule state included, drops the entry."""
    cache = KVCache(tmp_path)
    path = put(cache, IDENTITY, b"s" * 64, {"n_tokens": 3, "n_grouped": 0})
    clean = path.read_bytes()
    for offset in range(0, len(clean), 7):
        damaged = bytearray(clean)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        assert get(cache, IDENTITY) is None, offset
        assert not path.exists()
        path.write_bytes(clean)
    assert get(cache, IDENTITY)[0]["schedule_state"] == {"n_tokens": 3, "n_grouped": 0}


def test_an_absurd_header_length_is_not_allocated(tmp_path):
    import struct

    from selfextend_local.engine.kvcache import DIGEST, MAGIC

    cache = KVCache(tmp_path)
    path = tmp_path / f"{cache.key(IDENTITY)}.kv"
    path.write_bytes(b"{}" + struct.pack("<Q", 1 << 62) + b"d" * DIGEST + MAGIC)
    assert get(cache, IDENTITY) is None and not path.exists()


def test_temporary_files_are_not_entries_and_only_stale_ones_go(tmp_path):
    import os
    import time

    cache = KVCache(tmp_path, limit=10)  # everything is over the limit
    young = tmp_path / ".tmp-writing.part"  # another process is writing this one now
    old = tmp_path / ".tmp-crashed.part"
    young.write_bytes(STATE_MAGIC + b"x" * 100)
    old.write_bytes(STATE_MAGIC + b"x" * 100)
    stranger = tmp_path / ".tmp-someone-elses.part"  # named like ours, not written by us
    stranger.write_bytes(b"x" * 100)
    os.utime(stranger, (time.time() - 7 * 3600,) * 2)
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    put(cache, IDENTITY, b"y" * 100)
    assert [e.path.name for e in cache.entries()] == [f"{cache.key(IDENTITY)}.kv"]
    assert young.exists() and not old.exists() and stranger.exists()
    assert cache.clear() == 1 and young.exists()


@pytest.mark.parametrize("obstacle", ["entry is a directory", "folder is a file", "llama.cpp fails"])
def test_a_cache_that_cannot_be_written_says_so(tmp_path, obstacle):
    from selfextend_local.engine.kvcache import CacheWriteError

    root = tmp_path / "kv"
    cache = KVCache(root)
    write = lambda path: path.write_bytes(b"z")  # noqa: E731
    if obstacle == "folder is a file":
        root.write_text("not a folder")
    elif obstacle == "entry is a directory":
        (root / f"{cache.key(IDENTITY)}.kv").mkdir(parents=True)
    else:

        def write(path):
            raise OSError("llama.cpp could not write it: disk full")

    with pytest.raises(CacheWriteError, match="was not written"):
        cache.put(IDENTITY, write, 1, {}, {})
    assert get(cache, IDENTITY) is None
    assert not list(root.glob(".tmp-*")) if root.is_dir() else True


# -- the server's library of uploads (no model) -----------------------------------------------------


def library(tmp_path, **limits):
    from selfextend_local.serving.library import Library

    return Library(tmp_path / "docs", **limits)


def upload(data: bytes, name: str | None = None, kind: str = ""):
    from selfextend_local.serving.library import Upload

    return Upload(data, name, kind)


def test_one_document_uploaded_by_many_at_once_is_stored_once(tmp_path):
    """Eight threads store the same bytes at once: one reading, one copy, no temporary file left (the
    temporary names were the process id alone, and two writers collided)."""
    from concurrent.futures import ThreadPoolExecutor

    books = library(tmp_path)
    data = ("The lighthouse keeper counts the ships. " * 2000).encode()
    with ThreadPoolExecutor(8) as pool:
        cards = list(pool.map(lambda _: books.add(upload(data, "ships.txt")), range(16)))
    assert len({card.id for card in cards}) == 1 and len(books.cards()) == 1
    assert sorted(p.suffix for p in (tmp_path / "docs").iterdir()) == [".json", ".txt"]


def test_a_form_upload_stores_its_file_not_the_envelope(tmp_path):
    import httpx

    body = b"# Notes\n\nThe key is 4127."
    request = httpx.Request("POST", "http://x/", files={"file": ("notes.md", body, "text/markdown")})
    card = library(tmp_path).add(upload(request.read(), None, request.headers["content-type"]))
    assert card.name == "notes.md" and card.chars == len(body.decode())
    assert (tmp_path / "docs" / f"{card.id}.txt").read_bytes() == body


def test_a_pdf_without_a_name_is_read_as_a_pdf(tmp_path):
    from selfextend_local.testing import tiny_pdf

    books = library(tmp_path)
    for kind in ("application/pdf", ""):  # said by its type, or by its own signature
        card = books.add(upload(tiny_pdf("The harbour opens at dawn." + kind[:3]), None, kind))
        assert card.kind == "pdf" and "harbour opens" in books.text(card.id)


def test_a_pdf_mapping_its_glyphs_to_lone_surrogates_is_stored_cleaned(tmp_path):
    from selfextend_local.testing import tiny_pdf

    books = library(tmp_path)
    card = books.add(upload(tiny_pdf("The harbour", to_unicode="D800"), "odd.pdf"))
    assert books.text(card.id).strip("? \n") == ""  # each glyph a replacement: UTF-8 that can be written


def test_errors_name_the_users_file_and_no_server_path(tmp_path):
    books = library(tmp_path)
    for data, name in ((b"caf\xe9", "notes.txt"), (b"\x00\x01binary", "blob.md"), (b"%PDF-1.4 cut", "cut.pdf")):
        with pytest.raises(BadInputError) as err:
            books.add(upload(data, name))
        said = str(err.value)
        assert name in said and "/tmp" not in said and "selfextend-upload" not in said, said
    with pytest.raises(BadInputError) as err:
        books.add(upload(b"\xff\xfe" * 10, "x" * 10_000 + ".txt"))
    assert len(str(err.value)) < 400


def test_the_question_mark_of_qas_prompt_is_not_kept_in_a_document(tmp_path):
    books = library(tmp_path)
    card = books.add(upload(b"Before. " * 2000 + b"\x00QUESTION\x00 after.", "marked.txt"))
    assert "\x00" not in books.text(card.id) and "QUESTION after." in books.text(card.id)


def test_a_parse_that_takes_too_long_is_given_up_by_name(tmp_path):
    nested = b"<div>" * 100_000 + b"deep" + b"</div>" * 100_000
    with pytest.raises(BadInputError, match=r"deep.html took over 0.2 s to read and was given up"):
        library(tmp_path, seconds=0.2).add(upload(nested, "deep.html"))


def test_a_parse_that_needs_too_much_memory_is_refused_by_name(tmp_path):
    flat = b"<p>word</p>" * 200_000  # 2.2 MB of HTML: a parse tree of well over 100 MiB
    with pytest.raises(BadInputError, match=r"flat.html could not be read within the reader's 100 MiB"):
        library(tmp_path, memory=100 << 20).add(upload(flat, "flat.html"))


def test_listing_beside_removal_and_a_damaged_card(tmp_path):
    import threading

    books = library(tmp_path)
    cards = [books.add(upload(f"Document number {i}.".encode(), f"d{i}.txt")) for i in range(30)]
    (tmp_path / "docs" / f"{'0' * 32}.json").write_text("{not json")
    listed, stop = [], threading.Event()

    def lister() -> None:
        while not stop.is_set():
            listed.append(len(books.cards()))

    thread = threading.Thread(target=lister)
    thread.start()
    for card in cards:
        assert books.remove(card.id)
    stop.set()
    thread.join()
    assert listed and books.cards() == []
