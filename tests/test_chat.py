"""Conversations and Ctrl-C: a stopped reply keeps the session; an interrupted command exits cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from selfextend_local.tasks.chat import Conversation
from selfextend_local.tasks.corpus import pydoc_text


def test_stopped_reply_keeps_the_conversation_going(model):
    conversation = Conversation(
        model, ExtendSettings(), RuntimeSettings(), SamplingSettings(temperature=0, max_tokens=60)
    )
    polls = {"n": 0}

    def stop_soon() -> bool:
        polls["n"] += 1
        return polls["n"] > 6

    first = list(conversation.reply("Tell me a long story about a fox.", should_stop=stop_soon))
    assert first[-1].finish_reason == "interrupted" and 0 < first[-1].generated_tokens < 60
    assert conversation.messages[-1]["role"] == "assistant" and conversation.messages[-1]["content"]
    second = list(conversation.reply("Thanks. Now name a colour."))
    assert second[-1].finish_reason in ("stop", "length")
    assert second[-1].reused_tokens > first[-1].prompt_tokens  # the history stayed in the cache
    conversation.reset()
    assert conversation.messages == []
    conversation.close()


@pytest.mark.slow
def test_ctrl_c_during_ingestion_exits_130_without_traceback():
    cmd = [sys.executable, "-m", "selfextend_local.cli", "generate", "--raw", "--batch", "64", "-n", "4"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(pydoc_text()[:24000])
    proc.stdin.close()
    time.sleep(4)  # loading and the first chunks
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert "interrupted: stopped after" in err and "Traceback" not in err
