"""The clients people already use, unmodified from PyPI, against the real server and `Llama`: the `ollama`
package on Ollama's API, `instructor` with a pydantic model, and the `openai` client's less common calls."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.testing import start_server, stop_server

ollama = pytest.importorskip("ollama")
KEY = "ollama-key"
GREEDY = {"temperature": 0, "num_predict": 16}
COLOUR = {
    "type": "object",
    "properties": {"colour": {"type": "string", "maxLength": 20}, "hex": {"type": "string", "maxLength": 7}},
    "required": ["colour", "hex"],
}


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--api-key", KEY, "--parallel", "2", "--ctx", "2048")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def name(client):
    return client.list().models[0].model


def test_list_show_ps_and_version(client, server, name):
    assert name == "SmolLM2-135M-Instruct.Q4_1:latest"
    shown = client.show(name)
    assert shown.capabilities == ["completion"] and shown.details.family == "llama"
    assert shown.details.quantization_level == "Q4_1" and shown.details.parameter_size == "135M"
    assert shown.modelinfo["llama.context_length"] == 8192 and "<|im_start|>" in shown.template
    (loaded,) = client.ps().models
    assert loaded.model == name and loaded.context_length == 2048
    version = httpx.get(f"{server}/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert version["version"].count(".") == 2 and version["selfextend_local"]


def test_chat_streams_what_it_answers_whole(client, name):
    ask = [{"role": "user", "content": "Name three rivers."}]
    whole = client.chat(model=name, messages=ask, options=GREEDY)
    parts = list(client.chat(model=name, messages=ask, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content and whole.message.content.strip()
    assert parts[-1].done and parts[-1].done_reason == whole.done_reason == "length" and whole.eval_count == 16
    assert whole.prompt_eval_count > 5 and whole.total_duration > whole.eval_duration > 0


def test_generate_and_continue_from_its_context(client, name):
    first = client.generate(model=name, prompt="One, two, three,", raw=True, options=GREEDY)
    assert first.response.strip() and len(first.context) > 16
    more = client.generate(model=name, prompt="", context=first.context, raw=True, options=GREEDY)
    assert more.response.strip()  # it went on from where the first stopped
    templated = client.generate(model=name, prompt="Name a fruit.", system="Answer in one word.", options=GREEDY)
    assert templated.response.strip()


def test_format_with_a_schema_gives_json_that_validates(client, name):
    ask = [{"role": "user", "content": "Describe the colour of the sky as JSON."}]
    reply = client.chat(model=name, messages=ask, format=COLOUR, options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(reply.message.content), COLOUR)
    loose = client.generate(model=name, prompt="A JSON object about a cat.", format="json", options={"num_predict": 60})
    assert loose.done_reason == "length" or isinstance(json.loads(loose.response), (dict, list))


@pytest.mark.parametrize(
    ("call", "fragment", "status"),
    [
        (
            lambda c, n: c.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}]),
            "model 'llama3:8b' not found",
            404,
        ),
        (
            lambda c, n: c.chat(model=n, messages=[{"role": "user", "content": "hi"}], options={"repeat_penalty": 1.3}),
            "repeat_penalty",
            400,
        ),
        (
            lambda c, n: c.chat(model=n, messages=[{"role": "user", "content": "hi"}], options={"warp": 9}),
            "unrecognised option 'warp'",
            400,
        ),
        (
            lambda c, n: c.chat(
                model=n,
                messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "function", "function": {"name": "f"}}],
            ),
            "tools",
            400,
        ),
        (lambda c, n: c.chat(model=n, messages=[{"role": "user", "content": "hi"}], think=True), "think", 400),
    ],
)
def test_what_is_not_served_says_so_as_ollama_does(client, name, call, fragment, status):
    with pytest.raises(ollama.ResponseError) as err:
        call(client, name)
    assert err.value.status_code == status and fragment in err.value.error


def test_runner_options_and_keep_alive_are_the_servers(client, name):
    ask = [{"role": "user", "content": "Say hi."}]
    options = {**GREEDY, "num_ctx": 131072, "num_thread": 64, "num_gpu": 99}
    assert client.chat(model=name, messages=ask, options=options, keep_alive="5m").message.content.strip()


def test_the_key_and_the_host_check_hold_on_ollamas_api(server):
    bare = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError) as err:
        bare.list()
    assert err.value.status_code == 401 and "API key" in err.value.error


@pytest.mark.slow
def test_a_prompt_past_the_training_context_is_self_extended_on_ollamas_api():
    proc, url = start_server("--parallel", "1")
    try:
        client = ollama.Client(host=url)
        name = client.list().models[0].model
        text = pydoc_text()[:35000]  # ~8.4k tokens
        ask = [{"role": "user", "content": text + "\n\nWhat is this about? One sentence."}]
        body = {"model": name, "messages": ask, "options": GREEDY, "stream": False}  # the client drops our field
        raw = httpx.post(f"{url}/api/chat", json=body, timeout=600).json()
        assert raw["prompt_eval_count"] > 8192 and raw["selfextend"]["group"] > 1 and raw["message"]["content"].strip()
        again = client.chat(model=name, messages=ask, options=GREEDY)  # the slot holds the prompt: read once
        assert again.message.content.strip() and again.prompt_eval_count < 64
    finally:
        stop_server(proc)


def test_instructor_through_llama_gives_a_validated_pydantic_object():
    instructor = pytest.importorskip("instructor")
    from pydantic import BaseModel, Field

    from selfextend_local import Llama

    class City(BaseModel):
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)

    with Llama() as llm:
        create = instructor.patch(create=llm.create_chat_completion_openai_v1, mode=instructor.Mode.JSON_SCHEMA)
        ask = [{"role": "user", "content": "Which city is the Eiffel Tower in? Answer as JSON."}]
        city = create(messages=ask, response_model=City, max_tokens=60, temperature=0)
        streamed = list(llm.create_chat_completion_openai_v1(messages=ask, max_tokens=8, temperature=0, stream=True))
    assert isinstance(city, City) and city.country == "France"
    assert streamed[0].object == "chat.completion.chunk" and streamed[-1].choices[0].finish_reason


def test_the_openai_clients_other_calls(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
    (listed,) = client.models.list().data
    assert client.models.retrieve(listed.id).id == listed.id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert err.value.body["param"] == "logprobs"
