"""Drafts from the request's own text (engine/drafting.py): the reply is the one a token at a time gives.

Greedy replies with and without drafts are compared as tests/test_batching.py compares batched ones with
lone ones: a decode of several tokens rounds differently from a decode of one (measured here: logits up to
~0.9 apart on the bundled model, f16 or f32 cache, flash attention on or off), so the two replies are the
same tokens up to the first place where that rounding tipped a near tie. Most tests make drafting free
(``StepCosts.fixed = 0``: every match is drafted at full length) so that drafts are decoded and checked at
every step where the text allows, whatever the step costs on this machine.
"""

from __future__ import annotations

import json
import statistics

import llama_cpp
import pytest
from test_batching import Collector, assert_same

from selfextend_local.engine import drafting
from selfextend_local.engine.drafting import CostsByDepth, Drafter, StepCosts
from selfextend_local.engine.errors import BadInputError
from selfextend_local.engine.generate import stream_generate
from selfextend_local.engine.scheduler import Scheduler
from selfextend_local.engine.session import open_session
from selfextend_local.engine.settings import MAX_DRAFT, ExtendSettings, RuntimeSettings, SamplingSettings
from selfextend_local.engine.slots import Request
from selfextend_local.tasks.corpus import pydoc_text

SHORT = [  # scripts/greedy_outputs.py's short prompts
    "In two sentences, what does a librarian do?",
    "Write a short poem about the sea.",
    "List three fruits and their colours.",
]
EXTENDED = ExtendSettings(group=4, window=256)  # grouping happens inside a prompt of a few hundred tokens


@pytest.fixture
def free_drafts(model):
    """Drafting costs nothing: every match is drafted, up to the request's most."""
    costs = drafting.costs_for(model)
    costs.fixed = 0.0
    yield
    costs.fixed = None


def quoting(model, chars: int = 800) -> list[int]:
    """A chat turn asking for a passage of pydoc text back, word for word (the bundled model half-copies)."""
    return model.chat_tokens([{"role": "user", "content": f"Repeat this text exactly:\n\n{pydoc_text()[:chars]}"}])


def reply(session, prompt, sampling, **kwargs) -> Collector:
    out = Collector()
    out.last = None
    for chunk in stream_generate(session, prompt, sampling, on_logits=out.logits.append, **kwargs):
        out(chunk)
        out.last = chunk
    return out


def greedy_pair(model, prompt, n=40, extend=None, runtime=None, draft=8, **kwargs) -> tuple[Collector, Collector]:
    """The greedy reply without drafts and with them, each in a session of its own."""
    outs = []
    for k in (0, draft):
        sampling = SamplingSettings(temperature=0, max_tokens=n, draft=k)
        with open_session(model, len(prompt) + n, extend, runtime, generate=n) as session:
            outs.append(reply(session, prompt, sampling, **kwargs))
    return outs[0], outs[1]


# -- the drafter and the cost model, without a model --------------------------------------------------


def test_a_draft_is_what_followed_the_longest_recent_ngram():
    costs = StepCosts(fixed=0.0)
    text = [1, 2, 3, 4, 5, 6, 9, 2, 3, 4, 7, 8, 10, 11]
    drafter = Drafter(text + [3], most=4, costs=costs)
    assert drafter.propose(4, 1) == []  # ..., 11, 3: no 2-gram ends so before
    drafter.add(4)  # ..., 3, 4: the 2-gram (3, 4) was followed by 5, then (later) by 7
    assert drafter.propose(4, 1) == [7, 8, 10, 11]  # the latest place wins
    drafter.add(99)
    assert drafter.propose(4, 1) == []  # nothing matches: no draft, whatever it would cost
    long = Drafter([5, 6, 7, 8, 0, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8], most=8, costs=costs)
    assert long.propose(8, 1) == [0, 6, 7, 8, 1, 2, 3, 4]  # the 4-gram (5, 6, 7, 8), not the later 3-gram
    assert long.propose(2, 1) == [0, 6]  # no longer than the room


def test_the_index_grown_token_by_token_is_the_index_built_at_once():
    tokens = [t % 7 for t in range(300)] + [3, 1, 4, 1, 5, 9, 2, 6]
    grown = Drafter(tokens[:10], most=4, costs=StepCosts())
    for token in tokens[10:]:
        grown.add(token)
    assert grown.after == Drafter(tokens, most=4, costs=StepCosts()).after
    assert len(grown.after) <= len(drafting.NGRAMS) * len(tokens)


def test_the_draft_length_is_what_makes_the_most_tokens_a_second():
    costs = StepCosts()
    for tokens, seconds in [(1, 1.0), (2, 1.5), (5, 3.0), (9, 5.0), (1, 1.0), (9, 5.0)] * 20:
        costs.took(seconds, tokens)  # a + b * n with a = 0.5, b = 0.5: a token costs the step's fixed part
    assert costs.cost(2) == pytest.approx(1.5, rel=0.05) and costs.cost(9) == pytest.approx(5.0, rel=0.05)
    assert costs.worth(0.4, 8, 1) == 0  # a token kept 40% of the time does not pay for itself here
    assert 0 < costs.worth(0.95, 8, 1) < 8
    assert costs.worth(0.95, 8, 4) < costs.worth(0.95, 8, 1)  # beside three other slots' tokens, less
    assert StepCosts(fixed=0.0).worth(0.2, 8, 4) == 8  # free: the whole draft
    assert StepCosts(fixed=0.01).worth(0.0, 8, 1) == 0  # never kept: never drafted


def test_a_step_of_several_tokens_may_cost_more_than_a_line_from_one_token_says():
    """A CPU at depth: two tokens cost 2.3x one (another kernel than the one-token decode's), each token
    more little: a short draft loses, a long one that is mostly kept pays."""
    costs = StepCosts()
    for tokens, seconds in [(1, 1.0), (2, 2.3), (1, 1.0), (9, 3.9), (1, 1.0), (5, 3.0)] * 20:
        costs.took(seconds, tokens)
    assert costs.cost(1) == 1.0 and costs.cost(2) == pytest.approx(2.3, rel=0.1)
    assert costs.worth(0.7, 8, 1) == 0  # a short or a doubtful draft costs more than it makes
    assert costs.worth(0.95, 8, 1) == 8
    assert costs.worth(0.95, 1, 1) == 0  # one token drafted: the whole jump for one token more


def test_what_a_draft_costs_is_learned_for_each_depth_apart():
    """Near the start a step of nine costs 4.1x one, after 10,000 cells 3.7x (f16 here): each band of depth
    has its own costs (a drafter asks the band of its sequence's length)."""
    costs = CostsByDepth()
    for tokens, shallow, deep in [(1, 1.0, 1.0), (2, 1.6, 1.5), (9, 4.1, 3.7)] * 30:
        costs.took(shallow, tokens, 300)
        costs.took(deep, tokens, 10_000)
    assert costs.at(300).cost(9) == pytest.approx(4.1, rel=0.05)
    assert costs.at(10_000).cost(9) == pytest.approx(3.7, rel=0.05)
    assert costs.at(400) is costs.at(300) and costs.at(9000) is costs.at(10_000)
    costs.fixed = 0.0
    assert costs.at(300).fixed == 0.0 and costs.at(10_000).worth(0.2, 8, 4) == 8


def test_a_match_not_drafted_is_scored_against_the_reply():
    drafter = Drafter([1, 2, 3, 4, 5, 6, 7, 1, 2], most=4, costs=StepCosts(fixed=10.0))
    before = list(drafter.outcomes[2])
    assert drafter.propose(4, 1) == []  # too dear to draft
    for token in (3, 4, 9):  # the reply follows the match for two tokens, then leaves it
        drafter.add(token)
    kept, rejected = drafter.outcomes[2]
    assert kept == pytest.approx(before[0] * drafting.FORGET + 2)
    assert rejected == pytest.approx(before[1] * drafting.FORGET + 1)


def test_draft_settings_out_of_range_are_refused():
    for bad in (-1, MAX_DRAFT + 1):
        with pytest.raises(BadInputError, match=f"--draft must be between 0 and {MAX_DRAFT}, got {bad}"):
            SamplingSettings(draft=bad)
    with pytest.raises(BadInputError, match="--draft must be a whole number, got 2.5"):
        SamplingSettings(draft=2.5)


# -- one sequence ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_replies_are_the_same_with_drafts(model, free_drafts):
    """scripts/greedy_outputs.py's short prompts and two that quote: drafted where the text allows, and
    the same replies."""
    prompts = [model.chat_tokens([{"role": "user", "content": p}]) for p in SHORT]
    prompts += [quoting(model), model.tokenize(pydoc_text()[:1200] + "\n\nThe same text again:\n\n")]
    accepted = 0
    for prompt in prompts:
        plain, drafted = greedy_pair(model, prompt)
        assert plain.last.drafted == 0 and len(plain.tokens) > 10
        assert_same(plain, drafted)
        assert drafted.last.accepted <= drafted.last.drafted
        accepted += drafted.last.accepted
    assert accepted >= 20  # the quoting replies kept drafted tokens


@pytest.mark.parametrize("kv_type", [pytest.param("f16", marks=pytest.mark.slow), "q8_0"])
def test_drafts_under_selfextend(model, free_drafts, kv_type):
    """A prompt that groups (G4 W256, ~1k tokens) and a reply held after it (the usual case: no cell
    moves while generating), with a quantized cache too: the same reply, drafts kept, nothing left in the
    cache past the reply."""
    prompt = quoting(model, 3600)
    runtime = RuntimeSettings(kv_type=kv_type)
    plain, drafted = greedy_pair(model, prompt, extend=EXTENDED, runtime=runtime)
    assert_same(plain, drafted)
    assert drafted.last.accepted >= 5


@pytest.mark.slow
def test_drafts_stop_short_of_each_grouping_step(model, free_drafts):
    """A reply that cannot be held (it may run past the trained positions) groups every G tokens as it
    goes: a draft is never decoded across one of those steps, and the sequence ends as a token at a time
    leaves it: the same tokens, schedule state and cells."""
    prompt = quoting(model, 2400)
    n = 8000  # the hold's room would reach past the 8k trained positions: the reply is not held

    def replied(draft: int, most: int):
        """The reply, stopped before the first step after ``most`` tokens, and the sequence's state then."""
        sampling = SamplingSettings(temperature=0, max_tokens=n, draft=draft)
        with open_session(model, len(prompt) + n, EXTENDED, generate=n) as session:
            out = Collector()
            grouped = []
            for chunk in stream_generate(
                session, prompt, sampling, should_stop=lambda: len(out.tokens) >= most, on_logits=out.logits.append
            ):
                out(chunk)
                grouped.append(session.schedule.state()["n_grouped"])
            assert session.held is None and grouped[-1] > grouped[0]  # grouped while replying
            last = llama_cpp.llama_memory_seq_pos_max(session.mem, 0)
            return out, chunk, (list(session.tokens), session.schedule.state(), last, session.schedule.next_pos)

    drafted, chunk, after_drafts = replied(8, 40)
    plain, _, after_plain = replied(0, len(drafted.tokens))  # as many tokens, each decoded alone
    assert_same(plain, drafted)
    assert chunk.accepted > 0
    if plain.tokens == drafted.tokens:
        assert after_plain == after_drafts
    tokens, _, last, next_pos = after_drafts
    assert last == next_pos - 1 and len(tokens) == len(prompt) + len(drafted.tokens) - 1  # nothing left behind


def test_a_draft_ends_where_the_schedule_would_group(model):
    """Sequence.in_one_step: held, the room left; not held, the tokens before the neighbor schedule's next
    grouping, which falls where the tail of tokens not grouped reaches W + G."""
    from selfextend_local.engine.schedules import NeighborSchedule

    with open_session(model, 4096, EXTENDED, generate=64) as session:
        g, w = EXTENDED.group, EXTENDED.window
        for t in range(600, 640):
            session.schedule = NeighborSchedule.restore(g, w, {"n_tokens": t, "n_grouped": 300})
            session.tokens = [0] * t
            after = NeighborSchedule.restore(g, w, session.schedule.state())
            after.prepare()  # what staging the next token does first
            limit = after.n_grouped + w + g - t
            assert session.in_one_step(40) == min(40, limit)
        session.hold(10)
        assert session.in_one_step(40) == 10 and session.in_one_step(4) == 4


def test_a_grammar_refuses_what_it_must_and_the_reply_validates(model, free_drafts):
    """A reply held to a JSON schema with drafts from a prompt that holds the object: the grammar sampler
    only ever takes the tokens chosen (a drafted token it refuses ends the draft), the reply validates."""
    import jsonschema

    from selfextend_local.engine.grammar import response_format_structure

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "born": {"type": "integer"}, "field": {"type": "string"}},
        "required": ["name", "born", "field"],
    }
    structure = response_format_structure({"type": "json_schema", "json_schema": {"schema": schema}})
    source = {"name": "Ada Lovelace", "born": 1815, "field": "mathematics and the analytical engine"}
    text = f"Copy this record as JSON, exactly:\n{json.dumps(source)}\n{json.dumps(source)}"
    prompt = model.chat_tokens([{"role": "user", "content": text}])
    sampling = SamplingSettings(temperature=0, max_tokens=80, draft=8, **structure.fields())
    with open_session(model, len(prompt) + 80, generate=80) as session:
        out = reply(session, prompt, sampling)
    value = json.loads(model.detokenize(out.tokens))
    jsonschema.validate(value, schema)
    assert out.last.accepted > 5


# -- several slots, sampling ----------------------------------------------------------------------


@pytest.mark.slow
def test_several_slots_draft_in_one_decode(model, free_drafts):
    """Three quoting requests decoded together, each drafting in the same decode: each reply as alone
    without drafts."""
    prompts = [quoting(model, 400 + 200 * i) for i in range(3)]
    want = []
    for prompt in prompts:
        with open_session(model, len(prompt) + 32, generate=32) as session:
            want.append(reply(session, prompt, SamplingSettings(temperature=0, max_tokens=32)))
    sampling = SamplingSettings(temperature=0, max_tokens=32, draft=6)
    drafting_at_once = []
    with Scheduler.create(model, slots=3, longest=1024) as scheduler:
        context = scheduler.engine.context
        decode = context.decode

        def counted(spans):
            drafting_at_once.append(sum(1 for span in spans if span.logits == "all" and len(span.tokens) > 1))
            decode(spans)

        context.decode = counted
        outs = []
        for prompt in prompts:
            out = Collector()
            out.last = None
            scheduler.submit(Request(prompt, sampling, ExtendSettings(), on_chunk=out, on_logits=out.logits.append))
            outs.append(out)
        scheduler.run()
    assert max(drafting_at_once) >= 2
    for w, o in zip(want, outs):
        assert_same(w, o)


@pytest.mark.slow
def test_sampled_replies_keep_their_distribution(model, free_drafts):
    """At temperature 1 over the whole vocabulary, how far the reply follows the text it could copy (and
    that is drafted): the same distribution with drafts (other seeds) as without, within a tolerance that
    the broken rule of keeping every drafted token fails by far; and seed for seed the same replies (each
    kept token is the sampler's own draw)."""
    prompt = model.tokenize("The quick brown fox jumps over the lazy dog. " * 2 + "The quick")
    copy = model.tokenize(" brown fox jumps over the lazy", add_special=False)

    def followed(tokens: list[int]) -> int:
        return next((i for i, (a, b) in enumerate(zip(tokens, copy)) if a != b), len(copy))

    def replies(seeds, draft) -> dict[int, list[int]]:
        outs = {}
        with Scheduler.create(model, slots=4, longest=128) as scheduler:
            for seed in seeds:
                out = Collector()
                sampling = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_tokens=6, draft=draft)
                scheduler.submit(Request(prompt, sampling, ExtendSettings(), on_chunk=out))
                outs[seed] = out.tokens
            scheduler.run()
        return outs

    plain = replies(range(96), 0)
    drafted = replies(range(48), 8)
    same = sum(plain[s] == drafted[s] for s in drafted)
    assert same >= 44, same  # seed for seed (a draw may tip where rounding moved a probability)
    without = [followed(plain[s]) for s in range(48, 96)]
    with_drafts = [followed(drafted[s]) for s in range(48)]
    spread = (statistics.pvariance(without) / 48 + statistics.pvariance(with_drafts) / 48) ** 0.5
    tolerance = 4 * max(spread, 0.1)
    assert abs(statistics.mean(with_drafts) - statistics.mean(without)) <= tolerance
    # keeping every drafted token: after a first token that follows, the draft (the rest) is all taken
    broken = len(copy) * statistics.mean(followed(plain[s][:1]) for s in range(48, 96))
    assert broken - statistics.mean(without) > 2 * tolerance, (broken, statistics.mean(without), tolerance)


# -- the front ends -------------------------------------------------------------------------------


def test_llama_takes_llama_cpp_pythons_prompt_lookup_decoding():
    """Code written for llama-cpp-python passes its own LlamaPromptLookupDecoding (ours is the same class):
    drafts are made and kept, the reply is the one without them; another kind of draft model, or a draft
    length out of range, is refused by name."""
    from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding

    import selfextend_local
    from selfextend_local import Llama

    assert selfextend_local.LlamaPromptLookupDecoding is LlamaPromptLookupDecoding
    prompt = "The quick brown fox jumps over the lazy dog. " * 3 + "The quick"
    llm = Llama(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=8))
    drafting.costs_for(llm.model).fixed = 0.0
    out = llm.create_completion(prompt, max_tokens=16, temperature=0)
    plain = Llama().create_completion(prompt, max_tokens=16, temperature=0)
    assert out["choices"][0]["text"] == plain["choices"][0]["text"]
    assert out["timings"]["draft_n"] >= out["timings"]["draft_n_accepted"] > 5 and "timings" not in plain

    class DraftModel(LlamaDraftModel):
        def __call__(self, input_ids, /, **kwargs):
            return input_ids[:0]

    with pytest.raises(BadInputError, match=r"draft_model=DraftModel is not supported; pass LlamaPromptLookupDec"):
        Llama(draft_model=DraftModel())
    with pytest.raises(BadInputError, match=f"draft_model's num_pred_tokens must be between 0 and {MAX_DRAFT}, got 99"):
        Llama(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=99))


def test_the_command_line_refuses_a_draft_out_of_range():
    from click.testing import CliRunner

    from selfextend_local.cli import main

    for command in (["generate", "--draft", "99", "hello"], ["serve", "--draft", "-1"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert "--draft must be between 0 and 32" in result.output


@pytest.fixture(scope="module")
def server():
    from selfextend_local.testing import start_server, stop_server

    proc, url = start_server("--parallel", "1")
    yield url
    stop_server(proc)


def test_the_servers_take_a_draft_per_request_and_report_it(server, model):
    """OpenAI's ``"selfextend": {"draft": N}`` and Ollama's ``options.selfextend_draft``: drafted and kept
    tokens in llama.cpp's ``timings`` (Ollama's final object: beside its counts); out of range, a 400
    naming the field."""
    import httpx

    messages = [{"role": "user", "content": f"Repeat this text exactly:\n\n{pydoc_text()[:600]}"}]
    body = {"messages": messages, "max_tokens": 32, "temperature": 0}
    plain = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300).json()
    drafted = httpx.post(f"{server}/v1/chat/completions", json={**body, "selfextend": {"draft": 8}}, timeout=300)
    timings = drafted.json()["timings"]
    assert "draft_n" not in plain["timings"] and plain["timings"]["predicted_n"] == plain["usage"]["completion_tokens"]
    assert timings["draft_n"] >= timings["draft_n_accepted"] >= 0 and timings["draft_n"] > 0
    refused = httpx.post(f"{server}/v1/chat/completions", json={**body, "selfextend": {"draft": 99}}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "selfextend.draft"
    assert "selfextend.draft must be between 0 and 32, got 99" in refused.json()["error"]["message"]

    name = httpx.get(f"{server}/api/tags", timeout=60).json()["models"][0]["name"]
    ollama = {"model": name, "messages": messages, "stream": False}
    done = httpx.post(
        f"{server}/api/chat",
        json={**ollama, "options": {"num_predict": 32, "temperature": 0, "selfextend_draft": 8}},
        timeout=300,
    )
    assert done.json()["draft_n"] >= done.json()["draft_n_accepted"] >= 0
    bad = httpx.post(f"{server}/api/chat", json={**ollama, "options": {"selfextend_draft": -1}}, timeout=60)
    assert bad.status_code == 400 and "options.selfextend_draft must be between 0 and 32, got -1" in bad.json()["error"]
