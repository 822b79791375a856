"""Downloads through huggingface-hub against a local stand-in for the hub (never the internet)."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from click.testing import CliRunner
from hub_server import FakeHub

from selfextend_local.cli import main
from selfextend_local.evaluation.convert import rewrite_gguf
from selfextend_local.hub import RemoteFile, choose
from selfextend_local.paths import bundled_model

REPO = "acme/SmolLM2-135M-Instruct-GGUF"
MODEL_FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    """A real split GGUF (two parts) made from the bundled model."""
    folder = tmp_path_factory.mktemp("split")
    return rewrite_gguf(bundled_model(), folder / "SmolLM2-135M-Instruct-Q8_0.gguf", split_max_tensors=150)


@pytest.fixture
def hub(tmp_path, monkeypatch, split_files):
    fake_q2 = tmp_path / "fake-Q2_K.gguf"
    fake_q2.write_bytes(b"GGUF" + b"\0" * 100)
    with FakeHub() as server:
        server.add(
            REPO,
            {
                MODEL_FILE: bundled_model(),
                "SmolLM2-135M-Instruct-Q2_K.gguf": fake_q2,
                **{f"q8/{p.name}": p for p in split_files},
            },
        )
        server.add("acme/gated-GGUF", {MODEL_FILE: bundled_model()}, token="hf_secret")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("SELFEXTEND_LOCAL_MODELS", str(tmp_path / "models"))
        yield server


def resumed_from(hub: FakeHub, cut: int) -> bool:
    """A later transfer asked for the rest of the file, from what had arrived before the cut."""
    starts = [int(r.removeprefix("bytes=").split("-")[0]) for r in hub.ranges()]
    return any(0 < start <= cut for start in starts)


def run(*args):
    return CliRunner().invoke(main, list(args))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_quant_verifies_and_shows_info(hub, tmp_path):
    result = run("download", REPO, "--quant", "q4_1")
    assert result.exit_code == 0, result.output
    path = tmp_path / "models" / REPO / MODEL_FILE
    assert result.stdout.splitlines()[0] == str(path)
    assert sha(path) == sha(bundled_model())
    assert "training context:  8,192 tokens" in result.stdout


@pytest.mark.slow
def test_resume_after_a_cut_connection(hub, tmp_path):
    hub.cut_after = 30_000_000
    result = run("download", REPO, "--quant", "Q4_1")
    assert result.exit_code == 0, result.output
    assert resumed_from(hub, 30_000_000)
    assert sha(tmp_path / "models" / REPO / MODEL_FILE) == sha(bundled_model())


@pytest.mark.slow
def test_resume_in_a_later_run(hub, tmp_path):
    hub.cut_after = 20_000_000
    hub.fail_transfers = True  # the retry fails too: the first run ends with a partial file
    first = run("download", REPO, "--quant", "Q4_1")
    assert first.exit_code == 1 and "Traceback" not in first.output
    assert not (tmp_path / "models" / REPO / MODEL_FILE).exists()
    hub.fail_transfers = False
    second = run("download", REPO, "--quant", "Q4_1")
    assert second.exit_code == 0, second.output
    assert resumed_from(hub, 20_000_000)
    assert sha(tmp_path / "models" / REPO / MODEL_FILE) == sha(bundled_model())


def test_checksum_mismatch_is_detected_and_the_file_not_kept(hub, tmp_path):
    hub.corrupt.add(MODEL_FILE)
    result = run("download", REPO, "--quant", "Q4_1")
    assert result.exit_code == 1
    assert "checksum mismatch" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "models" / REPO / MODEL_FILE).exists()


def test_split_model_is_fetched_together_and_runs(hub, tmp_path):
    result = run("download", REPO, "--quant", "Q8_0")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "models" / REPO / "q8"
    assert sorted(p.name for p in folder.glob("*.gguf")) == [
        "SmolLM2-135M-Instruct-Q8_0-00001-of-00002.gguf",
        "SmolLM2-135M-Instruct-Q8_0-00002-of-00002.gguf",
    ]
    assert "architecture:      llama" in result.stdout


def test_missing_repository(hub):
    result = run("download", "acme/nothing-here", "--quant", "Q4_1")
    assert result.exit_code == 1
    assert "repository acme/nothing-here was not found" in result.stderr


def test_missing_quantization_lists_the_choices(hub):
    result = run("download", REPO, "--quant", "Q5_K_M")
    assert result.exit_code == 1
    assert "has no Q5_K_M GGUF; available: Q2_K, Q4_1, Q8_0" in result.stderr


def test_ambiguous_request_explains_the_choices(hub):
    result = run("download", REPO)
    assert result.exit_code == 2
    assert "choose with --quant (Q2_K, Q4_1, Q8_0)" in result.stderr


def test_gated_repository_needs_the_token(hub, monkeypatch, tmp_path):
    denied = run("download", "acme/gated-GGUF", "--quant", "Q4_1")
    assert denied.exit_code == 1 and "HF_TOKEN" in denied.stderr
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    allowed = run("download", "acme/gated-GGUF", "--quant", "Q4_1")
    assert allowed.exit_code == 0, allowed.output


def test_offline_mode_uses_the_downloaded_file(hub, monkeypatch, tmp_path):
    assert run("download", REPO, "--quant", "Q4_1").exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    before = len(hub.requests)
    result = run("download", REPO, "--quant", "Q4_1")
    assert result.exit_code == 0, result.output
    assert len(hub.requests) == before
    missing = run("download", REPO, "--quant", "Q8_0")
    assert missing.exit_code == 1 and "HF_HUB_OFFLINE" in missing.stderr


def test_model_option_downloads_on_first_use_then_runs(hub, tmp_path):
    result = run("generate", "--model", f"{REPO}:Q4_1", "--temperature", "0", "-n", "5", "Hello")
    assert result.exit_code == 0, result.output
    bundled = run("generate", "--temperature", "0", "-n", "5", "Hello")  # the same file, served by the hub
    assert result.stdout == bundled.stdout and result.stdout.strip()
    assert (tmp_path / "models" / REPO / MODEL_FILE).exists()
    hub.requests.clear()
    again = run("generate", "--model", f"{REPO}:Q4_1", "--temperature", "0", "-n", "5", "Hello")
    assert again.exit_code == 0 and not hub.requests  # the local file is used, no network


def test_models_lists_local_files(hub, tmp_path):
    folder = tmp_path / "models" / "someone" / "x"
    folder.mkdir(parents=True)
    shutil.copy(bundled_model(), folder / "copy-Q4_1.gguf")
    result = run("models")
    assert result.exit_code == 0, result.output
    assert "someone/x/copy-Q4_1.gguf" in result.stdout and "(bundled)" in result.stdout
    assert "8,192" in result.stdout


def test_quant_names_are_parsed_from_file_names():
    names = {
        "llama-2-7b-chat.Q4_K_M.gguf": "Q4_K_M",
        "qwen2-7b-instruct-q8_0.gguf": "Q8_0",
        "Model-IQ3_XXS.gguf": "IQ3_XXS",
        "model-f16-00001-of-00002.gguf": "F16",
    }
    for name, quant in names.items():
        assert RemoteFile(name, 1, None).quant == quant
    files = [RemoteFile(n, 1, None) for n in names]
    assert [f.path for f in choose(files, "r", quant="q8_0")] == ["qwen2-7b-instruct-q8_0.gguf"]


@pytest.mark.parametrize("spec", ["mistral-7b-instruct", "acme/nothing-GGUF:Q4_K_M"])
def test_without_a_network_a_hub_model_fails_at_once(tmp_path, monkeypatch, spec):
    """No retries for half a minute: one handshake to the (closed) endpoint, one line."""
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("SELFEXTEND_LOCAL_MODELS", str(tmp_path / "models"))
    start = time.perf_counter()
    result = run("generate", "-m", spec, "hi")
    assert time.perf_counter() - start < 5
    assert result.exit_code == 1 and "cannot reach the hub at http://127.0.0.1:9" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "Traceback" not in result.output
