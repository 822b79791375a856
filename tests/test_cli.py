"""The command line on the real bundled model: output, and one-line errors for bad input."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from selfextend_local.cli import main


@pytest.fixture
def run():
    def invoke(*args, input=None):
        return CliRunner().invoke(main, list(args), input=input)

    return invoke


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("Error")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_help_lists_every_command_and_each_has_help(run):
    from selfextend_local.cli import COMMANDS

    result = run("--help")
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1].split()
    assert all(name in listed for name in COMMANDS), (sorted(COMMANDS), listed)
    for name in COMMANDS:
        own = run(name, "--help")
        assert own.exit_code == 0 and f"Usage: main {name}" in own.output, (name, own.output)


def test_info_shows_model_card_and_reach_table(run):
    result = run("info")
    assert result.exit_code == 0, result.output
    assert "architecture:      llama" in result.stdout
    assert "training context:  8,192 tokens" in result.stdout
    assert "quantization:      Q4_1" in result.stdout
    assert "--group 4 --window 2048" in result.stdout
    assert " 2048  14,336  26,624  51,200" in result.stdout
    q8_0 = next(line for line in result.stdout.splitlines() if line.strip().startswith("q8_0"))
    assert "+0.05% / +0.13%" in q8_0 and "-: not measured" in result.stdout  # what each type costs, said where chosen
    import llama_cpp

    from selfextend_local.engine.build import KSHIFT_MOVED_CELLS, patch_level

    ours = patch_level(llama_cpp.__version__) >= KSHIFT_MOVED_CELLS  # which K-shift the loaded build has
    assert ("K-shift rotates:   the cells that moved" in result.stdout) == ours


def test_generate_streams_the_greedy_answer(run):
    """The command's answer is the model's own greedy reply to the question in its chat template."""
    from selfextend_local import Llama

    question = "What is the capital of France?"
    result = run("generate", "--temperature", "0", "-n", "12", question)
    assert result.exit_code == 0, result.output
    with Llama() as llm:
        reply = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=12, temperature=0)
    assert result.stdout == reply["choices"][0]["message"]["content"] + "\n"


def test_generate_reads_file_and_stdin(run, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("Name a colour.")
    from_file = run("generate", "--temperature", "0", "-n", "6", "--file", str(path))
    from_stdin = run("generate", "--temperature", "0", "-n", "6", input="Name a colour.")
    assert from_file.exit_code == 0 and from_stdin.exit_code == 0
    assert from_file.stdout == from_stdin.stdout and from_file.stdout.strip()


def test_verbose_reports_plan_and_division(run):
    result = run("generate", "-v", "-g", "4", "-w", "64", "--temperature", "0", "-n", "4", "Hello")
    assert result.exit_code == 0, result.output
    assert "plan: SelfExtend G=4 W=64 schedule=neighbor" in result.stderr
    assert "division: " in result.stderr and "probe KL" in result.stderr


def test_missing_model_file(run, tmp_path):
    result = run("generate", "--model", str(tmp_path / "nope.gguf"), "hi")
    assert_one_line_error(result, 1, "model file not found")


def test_not_a_gguf(run, tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a model at all")
    assert_one_line_error(run("info", str(bogus)), 1, "is not a GGUF file")


def test_window_not_multiple_of_group(run):
    assert_one_line_error(run("generate", "-g", "3", "-w", "100", "hi"), 2, "not a multiple of --group 3")


@pytest.mark.parametrize("option", ["--group", "--window", "--threads", "--max-tokens"])
@pytest.mark.parametrize("value", ["0", "-4"])
def test_zero_or_negative(run, option, value):
    assert_one_line_error(run("generate", option, value, "hi"), 2, option)


def test_empty_prompt(run):
    assert_one_line_error(run("generate", "   "), 2, "prompt is empty")


def test_input_beyond_the_extended_limit(run):
    long_text = "The grass is green. The sky is blue. " * 2000  # about 20k tokens
    result = run("generate", "--raw", "-g", "2", "-w", "2048", input=long_text)
    assert_one_line_error(result, 1, "reaches 14336", "use --group 4 --window 2048")


def test_debug_shows_the_traceback(run, tmp_path):
    result = run("generate", "--debug", "--model", str(tmp_path / "nope.gguf"), "hi")
    assert result.exit_code != 0
    assert result.exception is not None and "model file not found" in str(result.exception)


def chat_replies(result) -> list[str]:
    """Each reply ends with a newline; the >>> prompts go to stderr when stdout is not a terminal."""
    assert ">>> " not in result.stdout and ">>> " in result.stderr
    return [r for r in result.stdout.split("\n") if r.strip()]


def test_chat_two_turns_and_reset(run):
    result = run("chat", "--temperature", "0", "-n", "8", input="Hello!\n/reset\nName a fruit.\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "(conversation reset)" in result.stderr
    assert result.stdout.count("\n") == 2 and len(chat_replies(result)) >= 1


def test_chat_unknown_command_lists_the_commands(run):
    result = run("chat", "--temperature", "0", "-n", "4", input="/frobnicate\n/help\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "unknown command /frobnicate" in result.stderr
    assert result.stderr.count("/reset") >= 2 and result.stdout == ""  # listed twice, nothing sent to the model


def test_chat_survives_a_message_that_is_too_long(run):
    too_long = "The grass is green. " * 300  # over --ctx 512
    result = run("chat", "--ctx", "512", "--temperature", "0", "-n", "6", input=f"{too_long}\nHello!\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "Error: the input needs" in result.stderr and "--ctx" in result.stderr
    assert result.stdout.count("\n") == 1  # the next message was answered
