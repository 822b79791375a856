"""The engine on the real bundled model: identity on short inputs, cache consistency, division, reuse."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
from conftest import make_session

from selfextend_local.engine.errors import EngineError
from selfextend_local.engine.generate import stream_generate
from selfextend_local.engine.metrics import kl_divergence
from selfextend_local.engine.settings import RuntimeSettings, SamplingSettings
from selfextend_local.evaluation.perplexity import token_nlls

GREEDY = SamplingSettings(temperature=0, max_tokens=40)


def greedy_tokens(session, prompt):
    return [c.token for c in stream_generate(session, prompt, GREEDY) if c.token is not None]


def test_short_input_is_token_identical_to_plain(model, runtime):
    prompt = model.chat_tokens([{"role": "user", "content": "Write a short poem about the sea."}])
    assert len(prompt) + GREEDY.max_tokens < 128
    outputs = {}
    for name, group, schedule in [("plain", 1, "neighbor"), ("neighbor", 4, "neighbor"), ("llamacpp", 4, "llamacpp")]:
        with make_session(model, runtime, 512, group, 128, schedule) as session:
            outputs[name] = greedy_tokens(session, prompt)
    assert len(outputs["plain"]) > 10
    assert outputs["neighbor"] == outputs["plain"]
    assert outputs["llamacpp"] == outputs["plain"]


@pytest.mark.parametrize("schedule", ["neighbor", pytest.param("llamacpp", marks=pytest.mark.slow)])
def test_cache_positions_follow_the_schedule(model, pydoc_tokens, schedule):
    runtime = RuntimeSettings(batch=64)
    with make_session(model, runtime, 1024, 4, 128, schedule) as session:
        session.ingest(pydoc_tokens[:700])
        for token in pydoc_tokens[700:730]:  # generation-style single tokens keep the schedule going
            session.ingest([token])
        mem = session.mem
        assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == 0
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == session.schedule.next_pos - 1
        assert session.schedule.next_pos < 730 // 2  # most of the sequence is grouped
        assert len(session.tokens) == 730


@pytest.mark.slow
def test_probe_verdict_matches_what_native_division_does(model, pydoc_tokens, runtime):
    """Whatever the llama.cpp build: the probe's verdict agrees with perplexity under native division."""
    tokens = pydoc_tokens[:1200]
    ppl = {}
    verdict = None
    for division in ("native", "emulated"):
        with make_session(model, runtime, 1280, 4, 128, "neighbor", division) as session:
            ppl[division] = float(np.exp(token_nlls(session, tokens).mean()))
            if division == "native":
                verdict = session.divider.probe
    assert verdict is not None
    if verdict.native_correct:
        assert ppl["native"] == pytest.approx(ppl["emulated"], rel=0.01)
    else:
        assert ppl["native"] > 1.5 * ppl["emulated"], ppl
        assert "DEFECTIVE" in verdict.describe()


@pytest.mark.slow
def test_folded_division_gives_the_logits_of_one_shift_per_position(model, pydoc_tokens, monkeypatch):
    """The few-calls emulation must leave every key where, and rotated as, one shift per position does."""
    import selfextend_local.engine.division as division

    def one_shift_per_position(mem, seq, p0, p1, d):
        for p in range(p0, p1):
            if p // d != p:
                llama_cpp.llama_memory_seq_add(mem, seq, p, p + 1, p // d - p)

    runtime = RuntimeSettings(batch=64)
    tokens = pydoc_tokens[:500]
    logits = {}
    for name in ("folded", "per position"):
        if name == "per position":
            monkeypatch.setattr(division, "divide_emulated", one_shift_per_position)
        chunks = []
        with make_session(model, runtime, 512, 8, 64, "neighbor", "emulated") as session:
            session.ingest(tokens, on_logits=lambda offset, lg, out=chunks: out.append(lg.copy()))
        logits[name] = np.concatenate(chunks)
    assert logits["folded"].shape == (len(tokens), model.n_vocab)
    np.testing.assert_allclose(logits["folded"], logits["per position"], rtol=0, atol=1e-4)


def ingest_logits(model, tokens, division, group=8, window=64):
    chunks = []
    with make_session(model, RuntimeSettings(batch=64), 512, group, window, "neighbor", division) as session:
        session.ingest(tokens, on_logits=lambda offset, lg: chunks.append(lg.copy()))
        verdict = session.divider.probe
    return np.concatenate(chunks), verdict


@pytest.mark.slow
def test_native_division_gives_the_emulations_logits_on_a_correct_build(model, pydoc_tokens):
    """On our build (the seq_div fix) native division is exact; on a stock build it is measurably wrong."""
    tokens = pydoc_tokens[:500]
    native, verdict = ingest_logits(model, tokens, "native")
    emulated, _ = ingest_logits(model, tokens, "emulated")
    kl = kl_divergence(emulated, native)
    if verdict.native_correct:
        assert verdict.kl == pytest.approx(0, abs=1e-6)
        np.testing.assert_allclose(native, emulated, rtol=0, atol=1e-4)
    else:
        assert kl[-200:].mean() > 0.05, kl[-200:].mean()  # the defect shows once tokens are grouped


def test_the_probe_recognises_a_defective_division_and_falls_back(model, runtime):
    """A deliberately wrong divider (rounding to nearest instead of down) is caught, whatever the build."""
    from selfextend_local.engine.division import choose_divider

    def rounds_to_nearest(mem, seq, p0, p1, d):
        for p in range(p0, p1):  # lowest first: a moved cell never lands on one still to move
            target = min((p + d // 2) // d, (p1 - 1) // d)
            if target != p:
                llama_cpp.llama_memory_seq_add(mem, seq, p, p + 1, target - p)

    with make_session(model, runtime, 256) as session:
        divider = choose_divider(session.context, "auto", native=rounds_to_nearest)
    assert divider.name == "emulated" and not divider.probe.native_correct
    assert "DEFECTIVE" in divider.reason and divider.probe.kl > 1e-3


def test_auto_division_never_uses_a_defective_native_call(model, runtime):
    with make_session(model, runtime, 256, 4, 64, "neighbor", "auto") as session:
        divider = session.divider
    assert divider.probe is not None
    assert divider.name == ("native" if divider.probe.native_correct else "emulated")


@pytest.mark.slow
def test_prefix_reuse_gives_the_same_logits_as_a_fresh_ingestion(model, pydoc_tokens):
    runtime = RuntimeSettings(batch=64)
    a, b, c = pydoc_tokens[:600], pydoc_tokens[600:620], pydoc_tokens[700:750]
    with make_session(model, runtime, 1024, 4, 128) as reused:
        reused.ingest(a + b)
        n_reused = reused.prefill(a + c)
        got = reused.last_logits()
    with make_session(model, runtime, 1024, 4, 128) as fresh:
        fresh.ingest(a)
        fresh.ingest(c)
        want = fresh.last_logits()
    assert n_reused == len(a)
    assert int(np.argmax(got)) == int(np.argmax(want))
    assert float(kl_divergence(want, got)) < 1e-3


@pytest.mark.slow
def test_prefix_inside_the_grouped_region_is_not_reused(model, pydoc_tokens):
    runtime = RuntimeSettings(batch=64)
    with make_session(model, runtime, 1024, 4, 128) as session:
        session.ingest(pydoc_tokens[:800])
        assert session.prefill(pydoc_tokens[:300] + pydoc_tokens[900:910]) == 0
        assert len(session.tokens) == 310


def test_full_context_is_a_clear_error(model, runtime, pydoc_tokens):
    with make_session(model, runtime, 256) as session:
        with pytest.raises(EngineError, match="larger --ctx"):
            session.ingest(pydoc_tokens[:300])


@pytest.mark.slow
def test_perplexity_inside_the_training_context_is_close_to_plain(model, pydoc_tokens, runtime):
    """1.5k tokens, G4 W384: three quarters of the keys grouped, where plain decoding needs none."""
    tokens = pydoc_tokens[:1536]
    with make_session(model, runtime, 1536) as plain:
        plain_ppl = float(np.exp(token_nlls(plain, tokens).mean()))
    with make_session(model, runtime, 1536, 4, 384) as extended:
        ext_ppl = float(np.exp(token_nlls(extended, tokens).mean()))
    print(f"1.5k PPL plain {plain_ppl:.3f} neighbor G4 W384 {ext_ppl:.3f}")
    assert ext_ppl == pytest.approx(plain_ppl, rel=0.05)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rope_type": "none"}, "has no rotary position embedding"),
        ({"rope_type": "m-rope"}, "refuses position edits"),
        ({"rope_scaling": "yarn"}, "re-applies YaRN's magnitude scale"),
        ({"sliding_window": 4096}, "sliding-window attention"),
    ],
)
def test_models_that_cannot_be_extended_are_refused(change, reason):
    import dataclasses

    from selfextend_local.engine.errors import ModelError
    from selfextend_local.engine.model import Model
    from selfextend_local.paths import bundled_model

    with Model(bundled_model()) as unusual:
        unusual.__dict__["info"] = dataclasses.replace(unusual.info, **change)  # what its GGUF would say
        with pytest.raises(ModelError, match=reason):
            make_session(unusual, RuntimeSettings(), 256, 4, 64)
        with make_session(unusual, RuntimeSettings(), 256) as plain:  # without extension it still runs
            plain.ingest(unusual.tokenize("Hello there"))
