"""The OpenAI-compatible server, started as a subprocess on a free loopback port, driven by `openai`."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.testing import start_server, stop_server

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--api-key", KEY, "--queue-size", "2", "--parallel", "1")
    yield url
    stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0
    )
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_matches_unstreamed(client):
    messages = [{"role": "user", "content": "Write one sentence about rivers."}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="m", messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage = [], None, None
    for event in stream:
        if event.usage:
            usage = event.usage
        for choice in event.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens


def test_completion_and_stop(client):
    reply = client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    text = reply.choices[0].text
    assert reply.object == "text_completion" and " 7" not in text and "5" in text
    assert reply.choices[0].finish_reason == "stop"


def test_model_list(client):
    (model,) = client.models.list().data
    assert model.id == "SmolLM2-135M-Instruct.Q4_1" and model.object == "model"


@pytest.mark.slow
def test_prefix_is_reused(client):
    doc = pydoc_text()[:3000]
    ask = [{"role": "user", "content": doc + "\n\nWhat is this about?"}]
    first = client.chat.completions.create(model="m", messages=ask, max_tokens=4, temperature=0)
    ask2 = [
        {"role": "user", "content": doc + "\n\nWhat is this about?"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Say more."},
    ]
    second = client.chat.completions.create(model="m", messages=ask2, max_tokens=4, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1


def test_wrong_key_is_401_but_health_is_open(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/v1/models").status_code == 401


def test_malformed_json_and_bad_fields_are_400(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_json"
    field = httpx.post(f"{server}/v1/chat/completions", json={"messages": [], "max_tokens": 5}, headers=headers)
    assert field.status_code == 400 and field.json()["error"]["param"] == "messages"
    temp = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "temperature": -1}, headers=headers)
    assert temp.status_code == 400 and temp.json()["error"]["param"] == "temperature"
    big = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 10**6}, headers=headers)
    assert big.status_code == 400 and big.json()["error"]["param"] == "max_tokens"


def test_over_long_input_is_400_with_the_reason(client):
    long_text = "The grass is green. The sky is blue. " * 2000  # ~20k tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model="m", prompt=long_text, max_tokens=4, extra_body={"selfextend": {"group": 2, "window": 2048}}
        )
    error = err.value.body
    assert "reaches 14336" in error["message"] and error["param"] == "selfextend.group"
    # worded in the request's own terms, not as command-line flags
    assert "use selfextend.group=4, selfextend.window=2048" in error["message"] and "--" not in error["message"]


AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": "1, 2, 3, 4,", "max_tokens": 3000, "temperature": 0}  # ~20 s or more to generate here


def status(server) -> dict:
    return httpx.get(f"{server}/v1/status", headers=AUTH).json()


def seconds_until_idle(server, limit: float = 30) -> float:
    """How long until no request is queued or running (``limit`` when it never gets there)."""
    start = time.time()
    while time.time() - start < limit:
        now = status(server)
        if now["queued"] == 0 and now["busy_slots"] == 0:
            return time.time() - start
        time.sleep(0.1)
    return limit


def test_disconnect_mid_stream_frees_the_server(server, client):
    with httpx.stream("POST", f"{server}/v1/completions", headers=AUTH, json={**LONG, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data:") for line in got)
        assert status(server)["busy_slots"] == 1  # generating
    freed = seconds_until_idle(server)
    assert freed < 5, f"the abandoned stream held its slot for {freed:.1f} s"
    reply = client.completions.create(model="m", prompt="Hello", max_tokens=3, temperature=0)
    assert reply.choices[0].text and reply.usage.completion_tokens > 0


@pytest.mark.slow
def test_an_abandoned_request_that_does_not_stream_frees_its_slot(server):
    """The client gives up (a read timeout) and closes the connection: generation stops as for a stream."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", headers=AUTH, json=LONG, timeout=3)
    freed = seconds_until_idle(server)
    assert freed < 5, f"the abandoned request held its slot for {freed:.1f} s more"
    reply = httpx.post(f"{server}/v1/completions", headers=AUTH, json={**LONG, "max_tokens": 4}, timeout=60)
    assert reply.status_code == 200  # and the server goes on serving


def test_burst_beyond_the_queue_gets_429_and_nothing_hangs(server):
    def one(i):
        try:
            r = httpx.post(
                f"{server}/v1/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"prompt": f"Story {i}:", "max_tokens": 24, "temperature": 0},
                timeout=120,
            )
            return r.status_code, r.headers.get("retry-after")
        except httpx.HTTPError as exc:
            return repr(exc), None

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 429}, results
    assert codes.count(200) >= 3 and codes.count(429) >= 1
    assert all(retry == "1" for code, retry in results if code == 429)


@pytest.mark.slow
def test_a_self_extended_prompt_same_answer_as_generate(tmp_path):
    """Grouping forced on a ~1.4k-token prompt (G4 W256): the server's slot and generate answer alike. (Past
    the 8k training context the path is the same; scripts/greedy_outputs.py compares them at ~9.5k, which
    costs two 9.5k ingestions, minutes here.)"""
    text = pydoc_text()[:6000]  # ~1.4k tokens: past 4 x 256, so every later key is grouped
    args = ["-g", "4", "-w", "256", "--temperature", "0", "-n", "24"]
    cli = subprocess.run(
        [sys.executable, "-m", "selfextend_local.cli", "generate", "-v", "--raw", *args],
        input=text,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ},
    )
    assert cli.returncode == 0 and "SelfExtend G=4 W=256" in cli.stderr, cli.stderr
    proc, url = start_server("-g", "4", "-w", "256")
    try:
        reply = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=900).completions.create(
            model="m", prompt=text, max_tokens=24, temperature=0
        )
    finally:
        stop_server(proc)
    assert reply.usage.prompt_tokens > 4 * 256
    assert reply.choices[0].text == cli.stdout.rstrip("\n")


@pytest.mark.slow
def test_four_clients_at_once_get_what_each_gets_alone():
    """Four requests decoded together in four slots answer as each does alone (greedy)."""
    proc, url = start_server("--parallel", "4", "--ctx", "2048")
    try:
        asks = ["Name a colour.", "Name a fruit.", "Write one line about rain.", "Count to five."]

        def ask(text):
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 24, "temperature": 0}
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            return reply.json()["choices"][0]["message"]["content"]

        alone = [ask(text) for text in asks]
        assert status_of(url)["slots"] == 4
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, asks))
    finally:
        stop_server(proc)
    assert together == alone and all(alone)


def status_of(url) -> dict:
    return httpx.get(f"{url}/v1/status").json()


def test_a_field_left_out_is_the_servers_setting_and_every_response_says_what_served_it():
    """A server started with --schedule llamacpp: a request giving only a group keeps llamacpp (it was
    served with neighbor); the response's `selfextend` says which setting served it."""
    proc, url = start_server("--schedule", "llamacpp", "--parallel", "1", "--ctx", "2048")
    try:
        body = {"prompt": "The river", "max_tokens": 4, "temperature": 0}
        plain = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert plain["selfextend"]["schedule"] == "llamacpp" and plain["selfextend"]["kv_type"] == "f16"
        grouped = httpx.post(f"{url}/v1/completions", json={**body, "selfextend": {"group": 4}}, timeout=120).json()
        assert grouped["selfextend"]["group"] == 4 and grouped["selfextend"]["schedule"] == "llamacpp"
        assert grouped["selfextend"]["window"] % 4 == 0
        own = {**body, "selfextend": {"group": 2, "window": 512, "schedule": "neighbor"}}
        assert httpx.post(f"{url}/v1/completions", json=own, timeout=120).json()["selfextend"] == {
            "group": 2,
            "window": 512,
            "schedule": "neighbor",
            "kv_type": "f16",
        }
        streamed = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=120).text
        last = [line for line in streamed.splitlines() if line.startswith("data:") and "finish_reason" in line][-1]
        assert '"selfextend": {"group": 1' in last
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_a_long_prompt_streams_its_reading_progress_when_asked(client):
    """`return_progress`, as llama.cpp's server names it: chunks with prompt_progress, total, cache,
    processed and time_ms, before the first token; none unless asked."""
    text = pydoc_text()[:6000]  # ~1.5k tokens: three chunks of 512
    asked = client.completions.create(
        model="m", prompt=text, max_tokens=2, temperature=0, stream=True, extra_body={"return_progress": True}
    )
    progress, tokens = [], 0
    for event in asked:
        extra = event.model_extra or {}
        if "prompt_progress" in extra:
            assert tokens == 0  # all of it before the first token
            progress.append(extra["prompt_progress"])
        elif event.choices and event.choices[0].text:
            tokens += 1
    total = progress[-1]["total"]
    assert total > 1000 and progress[-1]["processed"] == total and len(progress) >= 3
    assert [p["processed"] for p in progress] == sorted(p["processed"] for p in progress)
    assert all(set(p) == {"total", "cache", "processed", "time_ms", "eta_ms"} for p in progress)
    left = [p["eta_ms"] for p in progress if p["processed"] < total]  # ours: the cost model's time left
    assert all(ms is None or ms >= 0 for ms in left) and progress[-1]["eta_ms"] in (0, None)
    quiet = client.completions.create(model="m", prompt=text, max_tokens=2, temperature=0, stream=True)
    assert not any("prompt_progress" in (event.model_extra or {}) for event in quiet)
