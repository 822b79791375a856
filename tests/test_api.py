"""The Python API: code written for llama_cpp.Llama runs on selfextend_local.Llama (the real bundled model)."""

from __future__ import annotations

import json

import jsonschema
import llama_cpp
import pytest
from hub_server import FakeHub

from selfextend_local import Llama
from selfextend_local.engine.errors import BadInputError, InputTooLongError
from selfextend_local.paths import bundled_model
from selfextend_local.tasks.corpus import pydoc_text

CHAT = [{"role": "user", "content": "Name three colours."}]
SCHEMA = {  # bounded lengths: a small model's strings run on, and the grammar then never closes them
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "points": {"type": "array", "items": {"type": "string", "maxLength": 80}, "maxItems": 3},
    },
    "required": ["title", "points"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm():
    with Llama() as model:
        yield model


@pytest.fixture(scope="module")
def reference():
    """llama-cpp-python's own Llama on the same file: the shapes to match."""
    model = llama_cpp.Llama(str(bundled_model()), n_ctx=1024, verbose=False)
    yield model
    model.close()


def keys(value) -> object:
    """The shape of a response: its keys, recursively (values' types for the leaves we compare)."""
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items() if k != "prompt_tokens_details"}
    if isinstance(value, list):
        return [keys(v) for v in value[:1]]
    return type(value).__name__ if value is not None else None


def test_completion_has_llama_cpp_pythons_shape(llm, reference):
    ours = llm("The capital of France is", max_tokens=8, temperature=0)
    theirs = reference("The capital of France is", max_tokens=8, temperature=0)
    assert keys(ours) == keys(theirs)
    assert ours["object"] == "text_completion" and ours["choices"][0]["text"]
    usage = ours["usage"]
    assert (
        usage["completion_tokens"] <= 8 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )


def test_chat_completion_has_llama_cpp_pythons_shape(llm, reference):
    ours = llm.create_chat_completion(CHAT, max_tokens=12, temperature=0)
    theirs = reference.create_chat_completion(CHAT, max_tokens=12, temperature=0)
    assert keys(ours) == keys(theirs)
    assert ours["object"] == "chat.completion" and ours["choices"][0]["message"]["content"]


def test_streams_have_llama_cpp_pythons_shape_and_the_whole_text(llm, reference):
    whole = llm.create_chat_completion(CHAT, max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
    ours = list(llm.create_chat_completion(CHAT, max_tokens=12, temperature=0, stream=True))
    theirs = list(reference.create_chat_completion(CHAT, max_tokens=12, temperature=0, stream=True))
    assert [keys(c) for c in ours[:1]] == [keys(c) for c in theirs[:1]]  # the role chunk
    assert ours[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert ours[-1]["choices"][0]["delta"] == {} and ours[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in ours) == whole
    pieces = list(llm("1, 2, 3,", max_tokens=6, temperature=0, stream=True))
    assert all(p["object"] == "text_completion" for p in pieces) and pieces[-1]["choices"][0]["finish_reason"]
    assert (
        "".join(p["choices"][0]["text"] for p in pieces)
        == llm("1, 2, 3,", max_tokens=6, temperature=0)["choices"][0]["text"]
    )


def test_echo_stop_seed_and_a_prompt_of_tokens(llm):
    echoed = llm("1, 2, 3,", max_tokens=6, temperature=0, echo=True)["choices"][0]["text"]
    plain = llm("1, 2, 3,", max_tokens=6, temperature=0)["choices"][0]["text"]
    assert echoed == "1, 2, 3," + plain
    stopped = llm("1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])["choices"][0]
    assert " 7" not in stopped["text"] and stopped["finish_reason"] == "stop"
    tokens = llm.tokenize(b"1, 2, 3,")
    assert llm(tokens, max_tokens=6, temperature=0)["choices"][0]["text"] == plain
    hot = [llm("Once upon a time", max_tokens=12, temperature=1.0, seed=s)["choices"][0]["text"] for s in (1, 1, 2)]
    assert hot[0] == hot[1] != hot[2]


def test_tokenize_detokenize_and_n_ctx(llm, reference):
    for text, bos, special in [
        (b"Hello world", True, False),
        (b"<|im_start|>hi", False, True),
        (b"<|im_start|>", False, False),
    ]:
        assert llm.tokenize(text, add_bos=bos, special=special) == reference.tokenize(
            text, add_bos=bos, special=special
        )
    tokens = llm.tokenize(b"Hello world", add_bos=False)
    assert llm.detokenize(tokens) == reference.detokenize(tokens) == b"Hello world"
    special = llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(special) == 1 and len(llm.tokenize(b"<|im_start|>", add_bos=False)) > 1
    assert llm.n_ctx() == 26624  # what G4 W2048 reaches on the 8k model
    assert Llama(n_ctx=4096).n_ctx() == 4096


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"logits_all": True}, "logits_all=True"),
        ({"embedding": True}, "embedding=True"),
        ({"lora_path": "x"}, "lora_path"),
    ],
)
def test_unsupported_constructor_arguments_are_named(kwargs, named):
    with pytest.raises(BadInputError, match=named):
        Llama(**kwargs)


def test_unsupported_call_arguments_are_named_and_neutral_ones_pass(llm):
    with pytest.raises(BadInputError, match="logprobs=5"):
        llm("Hi", max_tokens=2, logprobs=5)
    with pytest.raises(BadInputError, match="repeat_penalty=1.3"):
        llm.create_chat_completion(CHAT, max_tokens=2, repeat_penalty=1.3)
    with pytest.raises(TypeError, match="no_such_argument"):
        llm("Hi", no_such_argument=1)
    assert llm("Hi", max_tokens=2, repeat_penalty=1.0, logprobs=None, frequency_penalty=0.0)["choices"]
    assert Llama(n_ctx=0, use_mmap=True, logits_all=False).n_ctx() == 26624


def test_a_prompt_beyond_any_setting_names_python_arguments(llm):
    text = "The grass is green. The sky is blue. " * 2400  # ~24k tokens
    with pytest.raises(InputTooLongError) as err:
        Llama(group=2, window=2048)(text, max_tokens=4)
    message = str(err.value)
    assert "group=2, window=2048 reaches 14336" in message and "use group=4, window=2048" in message
    assert "--" not in message


def test_json_object_and_json_schema(llm):
    city = [{"role": "user", "content": "Return a JSON object with keys city and country for Paris."}]
    loose = llm.create_chat_completion(city, max_tokens=150, temperature=0, response_format={"type": "json_object"})
    assert loose["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(loose["choices"][0]["message"]["content"]), dict)
    ask = [{"role": "user", "content": "Describe a cat as JSON with a title and a list of points."}]
    schema = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}}
    for seed in (1, 2):  # sampled as well as greedy
        strict = llm.create_chat_completion(ask, max_tokens=200, temperature=0.8, seed=seed, response_format=schema)
        jsonschema.validate(json.loads(strict["choices"][0]["message"]["content"]), SCHEMA)


def test_a_schema_the_converter_cannot_handle_is_one_error(llm):
    bad = {
        "type": "json_schema",
        "json_schema": {"schema": {"type": "object", "properties": {"x": {"$ref": "#/nope"}}}},
    }
    with pytest.raises(BadInputError, match="response_format|schema") as err:
        llm.create_chat_completion(CHAT, max_tokens=4, response_format=bad)
    assert "\n" not in str(err.value)
    with pytest.raises(BadInputError, match="unknown response_format type"):
        llm.create_chat_completion(CHAT, max_tokens=4, response_format={"type": "yaml"})


def test_batch_answers_in_order_as_each_alone(llm):
    prompts = ["Name a fruit.", [{"role": "user", "content": "Name a tree."}], "1, 2, 3,", "The sky is"]
    progress = []
    together = llm.batch(
        prompts, parallel=2, max_tokens=10, temperature=0, progress=lambda d, t: progress.append((d, t))
    )
    alone = [
        llm.create_chat_completion(p, max_tokens=10, temperature=0)
        if isinstance(p, list)
        else llm(p, max_tokens=10, temperature=0)
        for p in prompts
    ]
    assert [r["object"] for r in together] == [
        "text_completion",
        "chat.completion",
        "text_completion",
        "text_completion",
    ]
    for got, want in zip(together, alone):
        assert got["choices"][0] == want["choices"][0]
    assert progress[-1] == (4, 4) and len(progress) >= 2


def test_batch_with_a_schema(llm):
    ask = [[{"role": "user", "content": f"Describe a {animal} as JSON."}] for animal in ("dog", "owl", "fish")]
    schema = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    for reply in llm.batch(ask, parallel=3, max_tokens=200, temperature=0, response_format=schema):
        jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), SCHEMA)


def test_from_pretrained_through_the_hub(tmp_path, monkeypatch):
    with FakeHub() as hub:
        hub.add("acme/SmolLM2-GGUF", {"SmolLM2-135M-Instruct-Q4_1.gguf": bundled_model()})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("SELFEXTEND_LOCAL_MODELS", str(tmp_path / "models"))
        model = Llama.from_pretrained("acme/SmolLM2-GGUF", filename="*Q4_1.gguf")
    assert model.model.path.is_relative_to(tmp_path / "models")
    assert model("Hi", max_tokens=2, temperature=0)["choices"]


def test_a_prompt_past_the_training_context_is_planned_self_extended(llm):
    """Planned as the command line plans it (the run itself is the one generate and the server make:
    compared in test_server.py with grouping forced at ~3k tokens, and at ~9.5k by scripts/greedy_outputs.py)."""
    from selfextend_local.api import _Call
    from selfextend_local.engine.settings import SamplingSettings
    from selfextend_local.serving.openai import Reply

    tokens = llm.model.tokenize(pydoc_text()[:38000])  # ~9.5k tokens
    call = _Call(tokens, SamplingSettings(max_tokens=8), Reply.new("m", chat=False))
    session = llm._session_for(call)
    assert len(tokens) > 8192 and session.plan.extended and (session.plan.group, session.plan.window) == (4, 2048)
    llm.close()
