"""Questions about a document on the real model: the document is ingested once and restored exactly."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from selfextend_local.cli import main
from selfextend_local.engine.kvcache import KVCache
from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.tasks.qa import DocumentQA

GREEDY = SamplingSettings(temperature=0, max_tokens=16)
EXTEND = ExtendSettings(group=4, window=128)  # grouping happens inside this ~750-token document
DOC = pydoc_text()[:3000]
Q1, Q2 = "What does the assert statement do?", "What is a generator?"


def answer(doc: DocumentQA, question: str):
    chunks = list(doc.ask(question))
    return "".join(c.text for c in chunks), chunks[-1]


@pytest.fixture
def cache(tmp_path):
    return KVCache(tmp_path / "kv")


def fresh_answer(model, question):
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY) as doc:
        return answer(doc, question)[0]


@pytest.mark.slow
def test_second_question_ingests_only_the_question(model, cache):
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        first, last1 = answer(doc, Q1)
        second, last2 = answer(doc, Q2)
        n_doc = len(doc.doc_tokens)
    assert last1.reused_tokens == 0
    assert last2.reused_tokens == n_doc and last2.prompt_tokens - n_doc < 30
    assert second == fresh_answer(model, Q2)  # the restored document state is the ingested one


def test_later_run_restores_the_document_from_disk(model, cache):
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        assert doc.load() == "ingested"
        want = answer(doc, Q1)[0]
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        assert doc.load() == "cache"
        got, last = answer(doc, Q1)
    assert got == want and last.reused_tokens == len(doc.doc_tokens)


@pytest.mark.slow
def test_corrupt_entry_is_rebuilt_not_used(model, cache):
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        doc.load()
        want = answer(doc, Q1)[0]
    (entry,) = cache.entries()
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        assert doc.load() == "ingested"
        (warning,) = doc.take_warnings()  # said once, not silent
        assert "damaged" in warning and "rebuilt" in warning
        assert answer(doc, Q1)[0] == want
    assert len(cache.entries()) == 1  # rebuilt


def test_the_cache_leaves_alone_what_it_did_not_write(model, tmp_path):
    """A directory named like an entry (with a user's file in it), and a stranger's file named like one:
    qa, `cache list` and `cache clear` never delete them, and say so."""
    kv = tmp_path / "kv"
    cache = KVCache(kv)
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        key = cache.key(doc.identity())
    folder = kv / f"{key}.kv"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("three years of work")
    stranger = kv / f"{'0' * 32}.kv"
    stranger.write_bytes(b"someone else's data")
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        assert doc.load() == "ingested"
        answer(doc, Q1)
    warnings = doc.take_warnings()
    assert any("is a directory" in w and "left it alone" in w for w in warnings), warnings
    assert (folder / "thesis.tex").read_text() == "three years of work"
    listed = run("cache", "list", "--cache-dir", str(kv))
    assert "0 entries" in listed.stderr and "left alone" in listed.stderr
    cleared = run("cache", "clear", "--cache-dir", str(kv))
    assert cleared.exit_code == 0 and "removed 0 entries" in cleared.stderr and "left" in cleared.stderr
    assert (folder / "thesis.tex").exists() and stranger.read_bytes() == b"someone else's data"


@pytest.mark.slow
def test_other_settings_do_not_share_an_entry(model, cache):
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        doc.load()
    other = ExtendSettings(group=4, window=128, schedule="llamacpp")
    with DocumentQA(model, DOC, other, RuntimeSettings(), GREEDY, cache) as doc:
        assert doc.load() == "ingested"
    assert len(cache.entries()) == 2


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.mark.slow
def test_cli_qa_and_cache_commands(tmp_path):
    path = tmp_path / "doc.md"
    path.write_text(DOC)
    kv = str(tmp_path / "kv")
    args = ["qa", "--doc", str(path), "--cache-dir", kv, "--temperature", "0", "-n", "8", "-g", "4", "-w", "128"]
    first = run(*args, Q1, "-q", Q2)
    assert first.exit_code == 0, first.output
    assert f"Q: {Q1}" in first.stdout and f"Q: {Q2}" in first.stdout
    assert "(ingested at " in first.stderr
    second = run(*args, Q1)
    assert "restored from the cache" in second.stderr
    listed = run("cache", "list", "--cache-dir", kv)
    assert listed.exit_code == 0 and "G4 W128 neighbor" in listed.stdout
    cleared = run("cache", "clear", "--cache-dir", kv)
    assert "removed 1 entries" in cleared.stderr
    assert run(*args, "--no-cache", Q1).exit_code == 0 and not list((tmp_path / "kv").glob("*.kv"))


@pytest.mark.slow
def test_cli_interactive(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    args = ["qa", "--doc", str(path), "--no-cache", "--temperature", "0", "-n", "6"]
    result = run(*args, "-i", input=f"{Q1}\n/exit\n")
    assert result.exit_code == 0, result.output
    asked = run(*args, Q1)  # the same question as an argument: the same greedy answer
    assert result.stdout == asked.stdout and asked.stdout.strip()


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda p: p / "nope.txt", "document not found"), (lambda p: p, "is a directory")],
)
def test_cli_bad_documents(tmp_path, make, message):
    result = run("qa", "--doc", str(make(tmp_path)), "What?")
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_cli_document_beyond_any_setting(tmp_path):
    path = tmp_path / "huge.txt"
    path.write_text("The grass is green and the sky is blue. " * 60_000)  # ~600k tokens
    result = run("qa", "--doc", str(path), "--no-cache", "What colour is the grass?")
    assert result.exit_code == 1, result.output
    assert "shorten the input" in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
def test_a_damaged_schedule_state_is_rebuilt_not_decoded(model, cache):
    """A flipped bit in the header's schedule state used to make every later qa fail in llama_decode."""
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        doc.load()
        want = answer(doc, Q1)[0]
    (entry,) = cache.entries()
    data = entry.path.read_bytes()
    at = data.index(b'"n_grouped": ') + len(b'"n_grouped": ')
    entry.path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        assert doc.load() == "ingested"
        assert answer(doc, Q1)[0] == want
    with DocumentQA(model, DOC, EXTEND, RuntimeSettings(), GREEDY, cache) as doc:
        assert doc.load() == "cache"  # the rebuilt entry is good


@pytest.mark.slow
def test_qa_answers_when_the_cache_cannot_be_written(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    blocked = tmp_path / "kv"
    blocked.write_text("a file where the cache's parent folder should be")
    args = ["--cache-dir", str(blocked / "kv"), "--temperature", "0", "-n", "6"]
    result = run("qa", "--doc", str(path), *args, Q1, "-q", Q2)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("the document cache was not written") == 1
    assert f"Q: {Q2}" in result.stdout


@pytest.mark.slow
def test_two_processes_sharing_a_cache_both_answer(tmp_path):
    """Each run's eviction (the limit holds about one entry) must not break the other's write or read."""
    import subprocess
    import sys

    docs = []
    for i in range(2):
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(pydoc_text()[3000 * (i + 1) : 3000 * (i + 2)])  # ~700 tokens, ~16 MB at f16
    kv = tmp_path / "kv"

    def qa(doc):
        cmd = [sys.executable, "-m", "selfextend_local.cli", "qa", "--doc", str(doc), "--cache-dir", str(kv)]
        cmd += ["--cache-size", "0.02", "-g", "4", "-w", "256", "--temperature", "0", "-n", "4", Q1, "-q", Q2]
        cmd += ["--threads", "1"]  # two processes on two cores: llama.cpp's spinning threads must not contend
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    for _ in range(2):
        procs = [qa(doc) for doc in docs]
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            assert f"Q: {Q2}" in out and "Traceback" not in err and "not written" not in err
    assert not list(kv.glob(".tmp-*"))


def test_progress_lines_when_stderr_is_a_pipe(tmp_path):
    """No terminal: periodic one-line progress with done/total, the rate and the time left."""
    import os
    import subprocess
    import sys

    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    cmd = [sys.executable, "-m", "selfextend_local.cli", "qa", "--doc", str(path), "--no-cache", "-n", "2", Q1]
    cmd += ["--batch", "128"]  # several chunks, so several lines
    env = {**os.environ, "SELFEXTEND_LOCAL_PROGRESS_SECONDS": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("reading document: ")]
    assert len(lines) >= 3 and "tokens (" in lines[0]
    assert any("tok/s, about" in line and "left" in line for line in lines[1:-1])
    assert lines[-1].startswith(f"reading document: {lines[-1].split()[2]}") and "done in" in lines[-1]
