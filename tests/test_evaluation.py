"""Evaluation tools on the real bundled model: references, pass-key, perplexity, validation."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_session

from selfextend_local.cli import main
from selfextend_local.engine.metrics import kl_divergence
from selfextend_local.engine.model import Model
from selfextend_local.engine.settings import RuntimeSettings
from selfextend_local.evaluation.convert import quantize, rewrite_gguf
from selfextend_local.paths import bundled_model
from selfextend_local.tasks.corpus import pydoc_text

PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ladder")
    (f16,) = rewrite_gguf(bundled_model(), folder / "smol-F16.gguf", to_f16=True)
    return {"F16": f16, **{q: quantize(f16, folder / f"smol-{q}.gguf", q) for q in ("Q8_0", "Q2_K")}}


@pytest.mark.slow
def test_dequantized_reference_keeps_metadata_and_behaviour(ladder, model):
    source, out = gguf.GGUFReader(bundled_model()), gguf.GGUFReader(ladder["F16"])
    keys = {k for k in source.fields if not k.startswith("GGUF.")}
    assert keys == {k for k in out.fields if not k.startswith("GGUF.")}
    assert out.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert out.fields["tokenizer.chat_template"].contents() == source.fields["tokenizer.chat_template"].contents()
    assert {t.tensor_type.name for t in out.tensors} == {"F16", "F32"}
    tokens = model.tokenize(pydoc_text()[:2000])
    with Model(ladder["F16"]) as f16:
        logits = []
        for m in (model, f16):
            with make_session(m, RuntimeSettings(), 1024) as s:
                s.ingest(tokens, on_logits=lambda off, lg: logits.append(lg))
    agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).mean()
    assert agree > 0.95  # the same weights, in F16


@pytest.mark.slow
def test_quantized_files_are_what_they_say(ladder):
    for q in ("Q8_0", "Q2_K"):
        with Model(ladder[q]) as m:
            assert m.info.quantization == q
    assert ladder["Q2_K"].stat().st_size < ladder["Q8_0"].stat().st_size < ladder["F16"].stat().st_size


@pytest.mark.slow
def test_convert_commands(tmp_path, ladder):
    out = tmp_path / "again-F16.gguf"
    result = run("convert", "dequantize", str(bundled_model()), str(out))
    assert result.exit_code == 0 and out.exists(), result.output
    assert run("convert", "dequantize", str(bundled_model()), str(out)).exit_code == 2  # never overwrites
    result = run("convert", "quantize", str(ladder["F16"]), str(tmp_path / "q"), "--types", "Q8_0")
    assert result.exit_code == 0 and (tmp_path / "q" / "smol-Q8_0.gguf").exists(), result.output
    bad = run("convert", "quantize", str(ladder["F16"]), str(tmp_path / "q"), "--types", "Q9_X")
    assert bad.exit_code == 2 and "unknown quantization" in bad.stderr


@pytest.mark.slow
def test_validate_passes_q8_and_fails_q2_at_default_thresholds(ladder, tmp_path):
    common = ["--reference", str(ladder["F16"]), "--tokens", "768", "-g", "4", "-w", "128", "--passkey-trials", "1"]
    good = run("validate", "--model", str(ladder["Q8_0"]), *common, "--json", str(tmp_path / "q8.json"))
    assert good.exit_code == 0, good.output
    assert "PASS" in good.stdout
    report = json.loads((tmp_path / "q8.json").read_text())
    assert report["passed"] and report["mean_kl"] < report["max_kl"] and report["top1_agreement"] > 0.9
    bad = run("validate", "--model", str(ladder["Q2_K"]), *common, "--json", str(tmp_path / "q2.json"))
    assert bad.exit_code == 1 and "FAIL" in bad.stdout
    worse = json.loads((tmp_path / "q2.json").read_text())
    assert worse["mean_kl"] > report["mean_kl"] and worse["p99_kl"] > report["p99_kl"]


@pytest.mark.slow
def test_passkey_command_table_json_and_heatmap(tmp_path):
    result = run(
        "passkey",
        "--lengths",
        "500,700",
        "--depths",
        "0.2,0.8",
        "--seeds",
        "1",
        "--methods",
        "none,neighbor",
        "-g",
        "4",
        "-w",
        "128",
        "--json",
        str(tmp_path / "pk.json"),
        "--plot",
        str(tmp_path / "pk.png"),
    )
    assert result.exit_code == 0, result.output
    assert "no extension" in result.stdout and "SelfExtend neighbor G4 W128" in result.stdout
    data = json.loads((tmp_path / "pk.json").read_text())
    assert len(data["results"]) == 8 and all(isinstance(r["correct"], bool) for r in data["results"])
    assert (tmp_path / "pk.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_ppl_command_every_method(tmp_path):
    doc = tmp_path / "text.txt"
    doc.write_text(pydoc_text()[:8000])
    result = run(
        "ppl",
        str(doc),
        "--tokens",
        "600",
        "--bucket",
        "200",
        "-g",
        "4",
        "-w",
        "128",
        "--csv",
        str(tmp_path / "p.csv"),
        "--json",
        str(tmp_path / "p.json"),
        "--plot",
        str(tmp_path / "p.png"),
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert set(report["methods"]) == {"none", "linear", "yarn", "neighbor", "llamacpp"}
    for method in report["methods"].values():
        assert 1 < method["ppl"] < 1000 and len(method["buckets"]) == 3
    # within the training context, linear scaling and YaRN with factor 1 are no extension
    assert report["methods"]["linear"]["ppl"] == pytest.approx(report["methods"]["none"]["ppl"], rel=1e-3)
    assert (tmp_path / "p.csv").read_text().startswith("method,start,stop,ppl")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["passkey", "--depths", "2"], "between 0 and 1"),
        (["passkey", "--methods", "nope"], "unknown method"),
        (["passkey", "--lengths", "a,b"], "whole numbers"),
        (["ppl", "missing.txt"], "document not found"),
    ],
)
def test_evaluation_bad_input(args, message):
    result = run(*args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


@pytest.fixture(scope="module")
def reference():
    from selfextend_local.evaluation.reference import ReferenceModel

    return ReferenceModel(bundled_model())


def engine_logits(model, tokens, group, window, schedule, batch=32):
    out = []
    with make_session(model, RuntimeSettings(batch=batch), 1024, group, window, schedule) as s:
        s.ingest(tokens, on_logits=lambda off, lg: out.append(lg))
    return np.concatenate(out)


@pytest.mark.slow
def test_reference_agrees_with_llama_cpp_without_extension(model, reference, pydoc_tokens):
    tokens = pydoc_tokens[:300]
    want = reference.logits(tokens)
    got = engine_logits(model, tokens, 1, 128, "neighbor")
    agree = float((want.argmax(-1) == got.argmax(-1)).mean())
    kl = float(kl_divergence(want, got).mean())
    print(f"reference vs llama.cpp, 300 tokens: top-1 agreement {agree:.3f}, mean KL {kl:.4f}")
    assert agree >= 0.95 and kl < 0.02


@pytest.mark.slow
def test_neighbor_is_closer_than_llamacpp_to_the_exact_method(model, reference, pydoc_tokens):
    tokens = pydoc_tokens[:600]
    exact = reference.logits(tokens, group=4, window=128)
    kl = {
        name: kl_divergence(exact, engine_logits(model, tokens, g, 128, sched))[128:].mean()
        for name, g, sched in [("none", 1, "neighbor"), ("neighbor", 4, "neighbor"), ("llamacpp", 4, "llamacpp")]
    }
    print("mean KL to the exact method beyond W: " + ", ".join(f"{k} {v:.4f}" for k, v in kl.items()))
    assert kl["neighbor"] < kl["llamacpp"]
    assert kl["neighbor"] < kl["none"] / 2


@pytest.mark.slow
def test_quantization_ladder_is_monotonic(tmp_path, model):
    """KL to the F16 reference rises Q8_0 < Q6_K < Q4_K_M < Q3_K_M < Q2_K with SelfExtend grouping on.

    At 512 tokens (G4 W256: half of them grouped) to fit the suite's time; docs/RESULTS.md has the same ladder
    past the training context.
    """
    from selfextend_local.engine.planning import Plan
    from selfextend_local.evaluation.convert import LADDER
    from selfextend_local.evaluation.validate import compare_logits, summarize
    from selfextend_local.tasks.corpus import long_tokens

    (f16,) = rewrite_gguf(bundled_model(), tmp_path / "r-F16.gguf", to_f16=True)
    candidates = [Model(quantize(f16, tmp_path / f"r-{q}.gguf", q)) for q in LADDER]
    reference = Model(f16)
    plan = Plan(4, 256, "neighbor", "auto", 512, 8192, "test")
    stats = [
        summarize(a)
        for a in compare_logits(candidates, reference, long_tokens(reference, 512), plan, RuntimeSettings())
    ]
    kls = [s["mean_kl"] for s in stats]
    print("mean KL " + ", ".join(f"{q} {k:.4f}" for q, k in zip(LADDER, kls)))
    assert kls == sorted(kls) and len(set(kls)) == len(kls)
