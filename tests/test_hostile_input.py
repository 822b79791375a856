"""What a hostile or careless user types: every read bounded, every number ranged, every error one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from selfextend_local.cli import main
from selfextend_local.tasks.documents import MAX_TEXT_BYTES


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    # the command ended by exiting (Click's error boundary), not by an exception escaping it
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def cli(*args, timeout=60, **kwargs):
    """The real command in a subprocess (for inputs that would hang or exhaust memory in this process)."""
    cmd = [sys.executable, "-m", "selfextend_local.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    return path


# -- reads that would hang or never end -----------------------------------------------------------


def test_a_fifo_is_refused_not_waited_on(fifo, tmp_path):
    for args in (
        ["generate", "--file", str(fifo)],
        ["qa", "--doc", str(fifo), "--no-cache", "What?"],
    ):
        done = cli(*args, timeout=30)  # opening the FIFO would block for ever
        assert done.returncode == 2 and "not a regular file" in done.stderr and "Traceback" not in done.stderr


def test_devices_are_refused(tmp_path):
    assert "not a regular file" in cli("qa", "--doc", "/dev/zero", "--no-cache", "What?", timeout=30).stderr
    out = cli("summarize", str(tmp_path / "a.txt"), "--out", "/dev/full", timeout=30)
    assert out.returncode == 2 and "not a regular file" in out.stderr


def test_summarize_gives_a_device_an_error_record(tmp_path):
    out = tmp_path / "s.jsonl"
    done = cli("summarize", "/dev/zero", "--out", str(out), "--temperature", "0", "-n", "4", timeout=60)
    assert done.returncode == 1, done.stderr
    assert "not a regular file" in out.read_text()


def test_files_over_the_limit_are_refused_before_any_work(tmp_path):
    big = tmp_path / "big.txt"
    with big.open("wb") as f:  # sparse: costs no disk
        f.truncate(MAX_TEXT_BYTES + 1)
    result = run("qa", "--doc", str(big), "--no-cache", "What?")
    one_line_error(result, 2, "files over 16 MiB are refused")
    one_line_error(run("generate", "--file", str(big)), 2, "files over 16 MiB are refused")


def test_stdin_over_the_limit_is_refused():
    result = run("generate", "--raw", input="a" * (MAX_TEXT_BYTES + 10))
    one_line_error(result, 2, "stdin holds more than 16 MiB")


def test_invalid_utf8_in_file_and_stdin(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    one_line_error(run("generate", "--file", str(path)), 2, "is not UTF-8 text")
    one_line_error(run("generate", input=b"caf\xe9 au lait"), 2, "stdin is not UTF-8 text")


# -- numbers out of range -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--threads", "100000"], "--threads must be between 1 and"),
        (["--ctx", "99999999999"], "--ctx must be between 1 and"),
        (["--batch", "99999999"], "--batch must be between 1 and 8192"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--temperature", "inf"], "--temperature must be a finite number"),
        (["--top-p", "nan"], "--top-p must be a finite number"),
        (["-g", "4096"], "--group must be between 1 and 256"),
        (["-g", "99999999", "-w", "8000"], "--group must be between 1 and 256"),
        (["-n", "99999999999"], "--max-tokens must be between 1 and"),
        (["--gpu-layers", "-1"], "--gpu-layers must be between 0 and"),
        (["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"], "at most 4 stop strings"),
        (["--stop", "x" * 300], "at most 256 characters"),
    ],
)
def test_numeric_options_have_ranges(args, fragment):
    one_line_error(run("generate", *args, "hi"), 2, fragment)


def test_a_group_larger_than_the_window_says_so():
    one_line_error(run("generate", "-g", "128", "-w", "64", "hi"), 2, "--window 64 is not a multiple of --group 128")


def test_max_tokens_beyond_any_setting_blames_max_tokens():
    error = one_line_error(run("generate", "-n", "1000000", "hi"), 1, "lower --max-tokens")
    assert "shorten the input" not in error


def test_a_context_larger_than_memory_is_refused_with_the_estimate():
    error = one_line_error(run("generate", "--ctx", str(1 << 24), "hi"), 1, "KV cache", "GiB")
    assert "tokens fit here" in error


@pytest.mark.parametrize("size", ["nan", "inf", "1e300", "0", "-1"])
def test_cache_size_range(tmp_path, size):
    (tmp_path / "d.txt").write_text("The sky is blue.")
    error = one_line_error(run("qa", "--doc", str(tmp_path / "d.txt"), "--cache-size", size, "What?"), 2)
    # the option named once, as the command line spells it (it once read "----cache-size")
    assert error.startswith("Error: --cache-size must be ") and "----" not in error, error


def test_a_home_that_does_not_exist():
    one_line_error(run("generate", "-m", "~nonexist/x.gguf", "hi"), 1, "no such user")


def test_a_truncated_model_says_what_llama_cpp_found(tmp_path):
    from selfextend_local.paths import bundled_model

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(bundled_model().read_bytes()[: 50 << 20])
    one_line_error(run("info", str(cut)), 1, "could not load", "not within the file bounds")


def test_a_fifo_as_model(fifo):
    done = cli("info", str(fifo), timeout=30)
    assert done.returncode == 1 and "not a regular file" in done.stderr


# -- logs ---------------------------------------------------------------------------------------


def test_verbose_shows_ours_and_llama_log_shows_llama_cpp():
    verbose = run("generate", "-v", "-g", "4", "-w", "64", "--temperature", "0", "-n", "2", "hi")
    assert verbose.exit_code == 0 and "plan: " in verbose.stderr
    assert not any(marker in verbose.stderr for marker in ("llama_model_loader", "llama_context:", "load_tensors"))
    llama = cli("generate", "--llama-log", "--temperature", "0", "-n", "2", "hi")
    assert llama.returncode == 0 and "llama_context" in llama.stderr


# -- what a careless user sets ------------------------------------------------------------------------


def test_a_progress_interval_that_is_not_a_number_is_a_warning():
    env = {**os.environ, "SELFEXTEND_LOCAL_PROGRESS_SECONDS": "abc"}
    done = cli("generate", "--temperature", "0", "-n", "2", "hi", env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "SELFEXTEND_LOCAL_PROGRESS_SECONDS='abc' is not a number of seconds" in done.stderr


def test_an_answer_to_a_full_disk_is_one_line():
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "selfextend_local.cli", "generate", "--temperature", "0", "-n", "8", "hi"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1 and "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert errors == ["Error: cannot write the output: No space left on device"], done.stderr


def test_more_slots_than_memory_holds_are_refused_before_allocating(model):
    from selfextend_local.engine.capacity import choose
    from selfextend_local.engine.errors import BadInputError
    from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings

    with pytest.raises(BadInputError) as err:
        choose(model, RuntimeSettings(), ExtendSettings(), slots=64, memory=8 << 30)
    assert "--parallel 64" in str(err.value) and "holds 22 such slots" in str(err.value)
    assert err.value.suggested == {"parallel": 22}
    fits = choose(model, RuntimeSettings(), ExtendSettings(), slots=8, memory=8 << 30)
    assert fits.slots == 8 and 8192 <= fits.cells < 26624  # cut, but still a whole training context
    start = time.perf_counter()
    done = cli("serve", "--parallel", "64", "--ctx", "131072", "--port", "0", timeout=120)
    assert done.returncode == 1 and "KV cache" in done.stderr and "Traceback" not in done.stderr
    assert "allocated" not in done.stderr and time.perf_counter() - start < 60
