"""One client's bad request is its own: refused by name (the settings' one validation, on Ollama's API as
on OpenAI's), or failed alone, while another client's stream goes on; the queue counters stay true."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import replace

import httpx
import pytest

from selfextend_local.engine.errors import BadInputError
from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from selfextend_local.testing import start_server, stop_server

BAD_OPTIONS = [  # (options, the field the 400 names): each was a 500, and most broke other clients' streams
    ({"seed": "x"}, "options.seed"),
    ({"seed": 1.5}, "options.seed"),
    ({"seed": 1e30}, "options.seed"),
    ({"top_k": 1.5}, "options.top_k"),
    ({"top_k": "x"}, "options.top_k"),
    ({"top_p": "x"}, "options.top_p"),
    ({"min_p": [1]}, "options.min_p"),
    ({"num_predict": "x"}, "options.num_predict"),
    ({"num_predict": None}, "options.num_predict"),
    ({"num_predict": math.nan}, "options.num_predict"),
    ({"temperature": "hot"}, "options.temperature"),
    ({"temperature": [1]}, "options.temperature"),
    ({"stop": 5}, "options.stop"),
    ({"stop": [1, 2]}, "options.stop"),
    ({"selfextend_group": "4"}, "options.selfextend_group"),
    ({"selfextend_window": "x"}, "options.selfextend_window"),
    ({"repeat_penalty": "x"}, "options.repeat_penalty"),
    ({"repeat_last_n": 1.5}, "options.repeat_last_n"),
]
DEAD_END = {"type": "string", "pattern": "^\\x00$"}  # no text satisfies it: the grammar allows no token
IMPOSSIBLE = {"allOf": [{"type": "string", "maxLength": 10}, {"type": "integer"}]}  # nothing validates


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--parallel", "2", "--ctx", "2048", "--queue-size", "8")
    yield url
    stop_server(proc)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=120
    )


def status(url: str) -> dict:
    return httpx.get(f"{url}/v1/status", timeout=30).json()


def bad_requests(url: str, name: str) -> list[tuple[str, httpx.Response]]:
    """Every bad request of the list, on both Ollama endpoints: (what it was, the answer)."""
    said = []
    ask = [{"role": "user", "content": "Hi"}]
    for options, field in BAD_OPTIONS:
        chat = {"model": name, "messages": ask, "stream": False, "options": {"num_predict": 4, **options}}
        generate = {"model": name, "prompt": "Hi", "stream": False, "options": {"num_predict": 4, **options}}
        said += [(field, post(url, "/api/chat", chat)), (field, post(url, "/api/generate", generate))]
    for context in ([1_000_000_000], [1, -1]):
        body = {"model": name, "prompt": "Hi", "context": context, "stream": False, "options": {"num_predict": 4}}
        said.append(("context", post(url, "/api/generate", body)))
    for schema, field in ((DEAD_END, "allows no token"), (IMPOSSIBLE, "does not validate")):
        body = {"model": name, "messages": ask, "format": schema, "stream": False, "options": {"num_predict": 30}}
        said.append((field, post(url, "/api/chat", body)))
    return said


def test_bad_requests_beside_a_stream_fail_alone_and_the_counters_stay_true(server):
    name = httpx.get(f"{server}/api/tags").json()["models"][0]["name"]
    events: list[str] = []
    began = threading.Event()

    def stream() -> None:
        body = {"messages": [{"role": "user", "content": "Count from one to a hundred."}], "stream": True}
        body.update(max_tokens=200, temperature=0)
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=300) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    began.set()

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert began.wait(120)
    during = status(server)  # one running, nothing waiting: queued is 0 (it counted the running one)
    answers = bad_requests(server, name)
    streaming.join(300)
    for what, reply in answers:
        assert 400 <= reply.status_code < 500 and what in reply.json()["error"], (what, reply.text)
    assert during["queued"] == 0 and during["busy_slots"] >= 1, during
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "stop")
    deadline = time.time() + 30
    while (now := status(server))["busy_slots"] and time.time() < deadline:
        time.sleep(0.2)
    assert now["queued"] == 0 and now["busy_slots"] == 0, now
    ok = post(server, "/api/generate", {"model": name, "prompt": "Hi", "stream": False, "options": {"num_predict": 4}})
    assert ok.status_code == 200 and ok.json()["done"]


def test_a_request_whose_sampler_fails_to_start_ends_alone(model):
    """Past every check (a setting forced in), a request whose sampler cannot be made ends with its error;
    the request beside it is served whole and the slot is free again (it was left half-started, and the
    next step failed every request)."""
    from selfextend_local.engine.scheduler import Scheduler
    from selfextend_local.engine.slots import Request

    with Scheduler.create(model, RuntimeSettings(), slots=2, longest=256) as scheduler:
        good = Request(model.tokenize("One, two, three,"), SamplingSettings(temperature=0, max_tokens=24))
        chunks, errors, ends = [], [], []
        good.on_chunk, good.on_error, good.on_finish = chunks.append, errors.append, lambda: ends.append("good")
        scheduler.submit(good)
        scheduler.advance()
        broken = SamplingSettings(temperature=0.5, max_tokens=8)
        object.__setattr__(broken, "seed", "x")  # as a seed that was never checked would arrive
        bad = Request(model.tokenize("Hi"), broken)
        failed: list[Exception] = []
        bad.on_error, bad.on_finish = failed.append, lambda: ends.append("bad")
        scheduler.submit(bad)
        scheduler.run()
        assert len(failed) == 1 and ends.count("bad") == 1 and ends.count("good") == 1
        assert not errors and chunks[-1].finish_reason == "length"
        assert scheduler.engine.active == 0 and not scheduler.busy


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"seed": "1"}, "seed must be a whole number, got '1'"),
        ({"top_k": 2.5}, "top-k must be a whole number"),
        ({"max_tokens": None}, "max-tokens must be a number, got null"),
        ({"max_tokens": math.nan}, "max-tokens must be a whole number, got nan"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": True}, "temperature must be a number, got True"),
        ({"stop": ["a", 3]}, "stop must be a string or a list of strings"),
        ({"repeat_penalty": 0}, "repeat-penalty must be above 0"),
        ({"presence_penalty": 3}, "presence-penalty must be at least -2 and at most 2"),
        ({"seed": "x" * 10_000}, "got 'xxxx"),
    ],
)
def test_the_settings_check_their_types_once_for_every_front_end(fields, named):
    with pytest.raises(BadInputError, match=named) as err:
        replace(SamplingSettings(), **fields)
    assert len(str(err.value)) < 200 and err.value.param == next(iter(fields))


@pytest.mark.parametrize(
    ("fields", "key"), [({"group": "4"}, "group"), ({"window": 2.0}, "window"), ({"schedule": 1}, "schedule")]
)
def test_extend_settings_check_their_types(fields, key):
    with pytest.raises(BadInputError) as err:
        ExtendSettings(**fields)
    assert err.value.param == key


def test_echoed_names_are_cut(server):
    long = "m" * 10_000
    for reply in (
        post(server, "/api/chat", {"model": long, "messages": [{"role": "user", "content": "Hi"}]}),
        httpx.get(f"{server}/v1/models/{long}"),
        post(server, "/api/generate", {"model": "x", "prompt": "Hi", long: 1}),
    ):
        assert 400 <= reply.status_code < 500 and len(reply.text) < 600, reply.text[:200]
