"""Structured output against hostile schemas and grammars: bounded before conversion, never a token the
grammar rejects, and a reply that claims to follow a schema does (the real bundled model, through `Llama`)."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from selfextend_local import Llama
from selfextend_local.engine import grammar
from selfextend_local.engine.errors import BadInputError
from selfextend_local.engine.grammar import GrammarDeadEnd, ReplyError

ASK = [{"role": "user", "content": "Describe a cat as JSON."}]
PAIR = {  # two bounded fields: the reply's strings once held raw newlines (not JSON)
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "colour": {"type": "string", "maxLength": 20}},
    "required": ["name", "colour"],
}


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.fixture(scope="module")
def llm():
    with Llama() as model:
        yield model


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "string", "maxLength": 20000}, "maxLength 20000 is over 1000"),
        ({"type": "string", "minLength": 100_000_000}, "minLength 100000000 is over 1000"),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1}, "no value satisfies"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "no value satisfies"),
        ({"enum": [f"v{i}" for i in range(100_000)]}, "an enum has 100000 values"),
        ({"type": "string", "pattern": "^a{1,100000}$"}, "a pattern repeats {1,100000} times"),
        ({"type": "strin"}, "not valid"),
        ({"$ref": "https://example.com/schema.json"}, "only references within it"),
    ],
)
def test_a_schema_beyond_the_bounds_is_refused_before_conversion(schema, fragment):
    with pytest.raises(BadInputError) as err:
        grammar.response_format_structure(fmt(schema))
    assert fragment in str(err.value) and err.value.param == "response_format"


def test_deep_gbnf_is_refused_before_llama_cpp_parses_it():
    deep = "root ::= " + '("a" ' * 20_000 + ")?" * 20_000  # overflowed the parser's stack (SIGSEGV)
    with pytest.raises(BadInputError, match="nests 20000 levels"):
        grammar.check_gbnf(deep)
    assert grammar.gbnf_nesting('root ::= "(((" [(] ("a") # ((((') == 1


def test_the_string_rule_admits_no_control_characters():
    made = grammar.response_format_structure(fmt(PAIR)).grammar
    assert "\\x00-\\x1F" in made.split("char ::=")[1].splitlines()[0]


@pytest.mark.parametrize(
    "structure",
    [{"response_format": fmt({"type": "string", "pattern": "^\\x00$"})}, {"grammar": 'root ::= "a" "\\x00"'}],
)
def test_a_grammar_with_no_way_forward_ends_with_an_error(llm, structure):
    """It used to abort the process: every token at -inf, one accepted anyway."""
    with pytest.raises(GrammarDeadEnd, match="allows no token"):
        llm.create_chat_completion(ASK, max_tokens=8, temperature=0, **structure)
    assert llm("One, two,", max_tokens=3, temperature=0)["choices"][0]["text"]  # the Llama goes on
    with pytest.raises(GrammarDeadEnd):
        llm.batch([ASK, ASK], parallel=2, max_tokens=8, temperature=0, **structure)


@pytest.mark.slow
def test_seeded_replies_held_to_a_schema_are_all_json(llm):
    for seed in range(20):
        reply = llm.create_chat_completion(ASK, max_tokens=120, temperature=0.9, seed=seed, response_format=fmt(PAIR))
        choice = reply["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), PAIR)


def test_a_reply_that_does_not_validate_is_an_error_not_a_success(llm):
    """allOf of two types: the grammar holds only the first, so no reply can validate."""
    impossible = {"allOf": [{"type": "string", "maxLength": 10}, {"type": "integer"}]}
    with pytest.raises(ReplyError, match="does not validate") as err:
        llm.create_chat_completion(ASK, max_tokens=40, temperature=0, response_format=fmt(impossible))
    assert err.value.text.strip()  # what the model wrote, for whoever wants to look


def test_one_llama_from_two_threads_gives_each_its_own_answer(llm):
    prompts = ["Name a river.", "Name a mountain."]
    alone = [llm(p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in prompts]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        got[i] = llm(prompts[i], max_tokens=12, temperature=0)["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got[0], got[1]] == alone


def test_two_streams_interleaved_on_one_thread_are_refused_by_name(llm):
    first = llm("Once upon a time", max_tokens=8, temperature=0, stream=True)
    head = next(first)["choices"][0]["text"]
    second = llm("The sea is", max_tokens=8, temperature=0, stream=True)
    with pytest.raises(BadInputError, match="still streaming"):
        next(second)
    text = head + "".join(c["choices"][0]["text"] for c in first)  # the first goes on, untouched
    assert text == llm("Once upon a time", max_tokens=8, temperature=0)["choices"][0]["text"]


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: Llama(seed="x"), "seed"),
        (lambda: Llama(n_ctx="big"), "n_ctx"),
        (lambda: Llama(group=2.5), "group"),
    ],
)
def test_constructor_arguments_are_type_checked_by_name(call, named):
    with pytest.raises(TypeError, match=f"^{named} must be"):
        call()


def test_call_arguments_are_type_checked_by_name(llm):
    with pytest.raises(TypeError, match="^stop must be"):
        llm("Hi", stop=5)
    with pytest.raises(TypeError, match="^max_tokens must be"):
        llm("Hi", max_tokens=True)
    with pytest.raises(TypeError, match=r"^messages\[0\] must be"):
        llm.create_chat_completion(["hello"])


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "a lone \ud800 surrogate"}],
        [{"role": "us\udc00er", "content": "hi"}],
        [{"role": "user\ue0000\ue001", "content": "hi"}],  # our segmentation's own marks
        [{"role": "user<|im_end|>", "content": "hi"}],
    ],
)
def test_text_that_is_not_unicode_or_a_role_that_is_not_a_name_is_an_input_error(llm, messages):
    with pytest.raises(BadInputError, match="not valid Unicode|must be a name"):
        llm.create_chat_completion(messages, max_tokens=2)


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7}, {"temperature": 0.9, "seed": 7, "top_k": 0}]
)
def test_the_grammars_quick_pick_is_the_whole_vocabularys_pick(llm, monkeypatch, sampling):
    """Looking only where the grammar can go (first bytes, likeliest first) picks what filtering the whole
    vocabulary picks: the same reply, greedy and seeded, with top-k and without."""
    from selfextend_local.engine import sampling as module

    ask = [{"role": "user", "content": "Describe a cat as JSON."}]
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "legs": {"type": "integer"}},
    }
    quick = llm.create_chat_completion(ask, max_tokens=40, response_format=fmt(schema), **sampling)
    monkeypatch.setattr(
        module.Candidates,
        "pick_allowed",
        lambda self, chain, grammar, logits, _: self.pick(chain, logits, first=grammar),
    )
    whole = llm.create_chat_completion(ask, max_tokens=40, response_format=fmt(schema), **sampling)
    assert quick["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]
