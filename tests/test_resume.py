"""A reading killed at any moment (SIGKILL, one kill in the middle of a checkpoint's write) and started
again resumes from its newest checkpoint and gives the answer an uninterrupted reading gives: through `qa`
and through the server, on the real model under SelfExtend (G4 W256: grouping steps all along)."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from selfextend_local.engine.kvcache import KVCache
from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.testing import CLI, start_server, stop_server

SETTING = ["-g", "4", "-w", "256", "--batch", "256"]
QUESTION = "What does the assert statement do?"
ANSWER = ["--temperature", "0", "-n", "12"]


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "doc.txt"
    path.write_text(pydoc_text()[:9000])  # about 2,100 tokens: 9 chunks of 256
    return path


def qa(document: Path, *more: str) -> list[str]:
    return [*CLI, "qa", "--doc", str(document), *SETTING, *ANSWER, *more, QUESTION]


@pytest.fixture(scope="module")
def uninterrupted(document) -> str:
    done = subprocess.run(qa(document, "--no-cache"), capture_output=True, text=True, timeout=600, check=True)
    return done.stdout


def checkpoint_tokens(cache: Path) -> int:
    """Tokens in the checkpoint the cache holds now (0: none)."""
    entries = KVCache(cache).entries()
    return max((e.meta["n_tokens"] for e in entries if e.meta["identity"].get("checkpoint")), default=0)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "it ended before the moment came"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_qa_killed_three_times_resumes_each_time_and_answers_as_uninterrupted(document, uninterrupted, tmp_path):
    cache = tmp_path / "kv"
    command = qa(document, "--cache-dir", str(cache), "--checkpoint-every", "0")
    rng = random.Random(7)
    had = 0

    def writing(had: int) -> bool:  # a checkpoint's temporary file is there: the kill lands in its write
        return checkpoint_tokens(cache) > had and any(cache.glob(".tmp-*.part"))

    for moment in ("after a random delay", "in the middle of a write", "after a random delay"):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if moment == "in the middle of a write":
            kill_when(proc, lambda had=had: writing(had))
        else:
            kill_when(proc, lambda had=had: checkpoint_tokens(cache) > had)
            time.sleep(rng.uniform(0, 0.5))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        now = checkpoint_tokens(cache)
        assert now > had, f"killed {moment}: no newer checkpoint is whole"
        had = now
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming at {had:,} of " in done.stderr
    assert done.stdout == uninterrupted
    assert checkpoint_tokens(cache) == 0  # the finished document's entry replaced the checkpoint


@pytest.mark.slow
def test_qa_stopped_by_ctrl_c_says_how_far_and_that_the_same_command_resumes(document, uninterrupted, tmp_path):
    cache = tmp_path / "kv"
    command = qa(document, "--cache-dir", str(cache), "--checkpoint-every", "3600")
    env = {**os.environ, "SELFEXTEND_LOCAL_PROGRESS_SECONDS": "0"}  # a progress line a chunk
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("reading document: 512/"):
            proc.send_signal(signal.SIGINT)  # Ctrl-C while the document is read
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    last = rest.strip().splitlines()[-1]
    assert proc.returncode == 130, rest
    assert last.startswith("interrupted: stopped after ") and "the same command resumes at " in last, rest
    assert "Traceback" not in rest
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert "resuming at " in done.stderr and done.stdout == uninterrupted


def _small_files() -> None:
    # a full disk, as far as this process can tell: writes beyond 4 MiB fail (EFBIG; Python ignores SIGXFSZ)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))


@pytest.mark.slow
def test_qa_on_a_full_disk_reads_on_without_checkpoints_and_answers(document, uninterrupted, tmp_path):
    command = qa(document, "--cache-dir", str(tmp_path / "kv"), "--checkpoint-every", "0")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, preexec_fn=_small_files)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("the reading goes on without checkpoints") == 1, done.stderr
    assert done.stdout == uninterrupted and "Traceback" not in done.stderr
    assert not list((tmp_path / "kv").glob(".tmp-*"))


def read_events(url: str, ident: str, until=None) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{url}/v1/documents/{ident}/read", json={}, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                events.append(json.loads(line[5:]))
                if until is not None and until(events[-1]):
                    break
    return events


@pytest.mark.slow
def test_the_server_killed_mid_reading_resumes_it_after_a_restart(document, uninterrupted, tmp_path):
    import threading

    cache = tmp_path / "kv"
    args = ["--cache-dir", str(cache), "--checkpoint-every", "0", "--parallel", "1", *SETTING]
    proc, url = start_server(*args)
    card = httpx.post(f"{url}/v1/documents?name=doc.txt", content=document.read_bytes(), timeout=60).json()
    follower = threading.Thread(target=lambda: _read_quietly(url, card["id"]), daemon=True)
    follower.start()  # a client follows the reading while the server is killed under it
    kill_when(proc, lambda: checkpoint_tokens(cache) >= 768)
    kept = checkpoint_tokens(cache)
    proc, url = start_server(*args)
    try:
        events = read_events(url, card["id"])
        reading = [e for e in events if e["state"] == "reading"]
        assert reading[0]["resumed"] == kept and reading[0]["done"] > kept
        assert all(e["seconds_left"] is None or e["seconds_left"] >= 0 for e in reading)
        assert events[-1]["state"] == "ready"
        body = {"document": card["id"], "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12}
        reply = httpx.post(f"{url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=300).json()
    finally:
        stop_server(proc)
    assert reply["choices"][0]["message"]["content"].strip() == uninterrupted.strip()
    assert checkpoint_tokens(cache) == 0


def _read_quietly(url: str, ident: str) -> None:
    try:
        read_events(url, ident)
    except httpx.HTTPError:
        pass  # the server was killed under it


@pytest.mark.slow
def test_generate_file_killed_mid_reading_resumes(document, tmp_path):
    cache = tmp_path / "kv"
    base = [*CLI, "generate", "--file", str(document), *SETTING, *ANSWER, "--cache-dir", str(cache)]
    want = subprocess.run([*base, "--no-cache"], capture_output=True, text=True, timeout=600, check=True).stdout
    proc = subprocess.Popen([*base, "--checkpoint-every", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_when(proc, lambda: checkpoint_tokens(cache) >= 768)
    kept = checkpoint_tokens(cache)
    done = subprocess.run([*base, "--checkpoint-every", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming at {kept:,} of " in done.stderr and done.stdout == want
    assert checkpoint_tokens(cache) == 0
