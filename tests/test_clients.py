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
    assert shown.capabilities == ["completion", "tools"] and shown.details.family == "llama"
    assert shown.details.quantization_level == "Q4_1" and shown.details.parameter_size == "135M"
    assert shown.modelinfo["llama.context_length"] == 8192 and "<|im_start|>" in shown.template
    assert shown.template.startswith("{#") and "not Ollama's Go template" in shown.template.split("#}")[0]
    parameters = dict(line.split(None, 1) for line in shown.parameters.splitlines())
    assert parameters["num_ctx"] == "2048" and parameters["temperature"] == "0.7" and "repeat_penalty" in parameters
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


def test_a_follow_up_after_a_context_is_the_next_users_turn(client, name):
    """A prompt after a reply's context is wrapped as the template's next user turn (it was appended raw,
    and the reply to it came back empty)."""
    first = client.generate(model=name, prompt="Name a fruit.", options=GREEDY)
    more = client.generate(model=name, prompt="Name a vegetable.", context=first.context, options=GREEDY)
    assert more.response.strip() and more.context[: len(first.context)] == first.context
    assert more.prompt_eval_count > 6  # the assistant's turn closed and a user's opened, not 5 tokens of text


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
            lambda c, n: c.chat(model=n, messages=[{"role": "user", "content": "hi"}], options={"repeat_penalty": 0}),
            "options.repeat_penalty must be above 0",
            400,
        ),
        (
            lambda c, n: c.chat(model=n, messages=[{"role": "user", "content": "hi"}], options={"mirostat": 2}),
            "options.mirostat is not supported",
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
                tools=[{"type": "function", "function": {"name": f}} for f in "fg"],
            ),
            "tools: give one function",
            400,
        ),
        (lambda c, n: c.embed(model=n, input="hi"), "/api/embed is not supported", 501),
        (lambda c, n: c.pull(n), "/api/pull is not supported", 501),
        (lambda c, n: c.delete(n), "/api/delete is not supported", 501),
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


def test_repeat_penalty_and_the_other_penalties_are_applied(client, name):
    """The penalties Ollama's clients send by default are llama.cpp's penalties sampler here (they were refused)."""
    prompt = "echo echo echo echo echo echo echo echo"
    plain = client.generate(model=name, prompt=prompt, raw=True, options=GREEDY)
    penalised = client.generate(model=name, prompt=prompt, raw=True, options={**GREEDY, "repeat_penalty": 1.8})
    assert plain.response.strip() and penalised.response.strip() and penalised.response != plain.response
    usual = {**GREEDY, "repeat_penalty": 1.1, "repeat_last_n": 64, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    assert client.chat(model=name, messages=[{"role": "user", "content": "Say hi."}], options=usual).message.content


def test_unknown_endpoints_answer_in_ollamas_shape(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path, status in (
        ("POST", "/api/embeddings", 501),
        ("POST", "/api/nothing", 404),
        ("GET", "/api/chat", 405),
    ):
        reply = httpx.request(method, f"{server}{path}", headers=headers, json={})
        assert reply.status_code == status and path in reply.json()["error"], reply.text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}


def test_one_tool_on_ollamas_chat_is_a_call_to_it(client, name):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat(model=name, messages=ask, tools=[WEATHER], options={"temperature": 0, "num_predict": 40})
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(call.function.arguments["city"], str)
    streamed = list(
        client.chat(model=name, messages=ask, tools=[WEATHER], stream=True, options=GREEDY | {"num_predict": 40})
    )
    assert streamed[-1].message.tool_calls[0].function.arguments == call.function.arguments


def test_a_named_tool_choice_is_a_call_in_openais_shape(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(
        model="m", messages=ask, tools=[WEATHER], tool_choice=named, max_tokens=40, temperature=0
    )
    choice = reply.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    parts = client.chat.completions.create(
        model="m", messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=40, temperature=0, stream=True
    )
    chunks = list(parts)
    streamed = "".join(tc.function.arguments or "" for c in chunks for tc in c.choices[0].delta.tool_calls or [])
    assert streamed == call.function.arguments and chunks[-1].choices[0].finish_reason == "tool_calls"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=ask, tools=[WEATHER], max_tokens=4)
    assert err.value.body["param"] == "tool_choice" and "response_format" in err.value.body["message"]


def test_instructor_in_its_default_mode_against_serve(server):
    """instructor.from_openai's default mode (TOOLS), unmodified, against the server (it was a 400)."""
    instructor = pytest.importorskip("instructor")
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)

    client = instructor.from_openai(openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120))
    ask = [{"role": "user", "content": "Which city is the Eiffel Tower in?"}]
    city = client.chat.completions.create(model="m", response_model=City, messages=ask, max_tokens=60, temperature=0)
    assert isinstance(city, City) and city.name
