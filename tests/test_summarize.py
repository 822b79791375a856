"""Batch summarisation: records, resumption, a kill in the middle, failures, and long files in parts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from selfextend_local.cli import main
from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.tasks.records import RecordLog
from selfextend_local.testing import make_text_files

FAST = ["--temperature", "0", "-n", "8"]


def make_files(folder, n=4, chars=1500):
    return make_text_files(folder, n, chars)


def read_records(path):
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]  # fails on any broken line


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("parallel", ["1", pytest.param("4", marks=pytest.mark.slow)])
def test_records_failures_and_resume(tmp_path, parallel):
    files = make_files(tmp_path, 3)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "empty.txt").write_text("")
    inputs = [str(p) for p in files] + [str(tmp_path / "blob.bin"), str(tmp_path / "empty.txt")]
    out = tmp_path / "out.jsonl"
    first = run("summarize", *inputs, "--out", str(out), "--parallel", parallel, *FAST)
    assert first.exit_code == 1, first.output  # two files failed
    records = sorted(read_records(out), key=lambda r: inputs.index(r["path"]))  # completion order when parallel
    assert [r["path"] for r in records] == inputs
    for r in records[:3]:
        assert r["error"] is None and r["summary"] and r["method"] == "direct"
        assert r["prompt_tokens"] > 100 and r["summary_tokens"] > 0 and r["seconds"] > 0 and len(r["sha256"]) == 64
    assert "binary" in records[3]["error"] and "empty" in records[4]["error"]
    second = run("summarize", *inputs, "--out", str(out), "--parallel", parallel, *FAST)
    assert "0 summarised (0 failed), 5 already done" in second.stderr
    assert sorted(read_records(out), key=lambda r: inputs.index(r["path"])) == records
    files[0].write_text("Changed content: the meeting moved to Tuesday.")
    third = run("summarize", *inputs, "--out", str(out), "--parallel", parallel, *FAST)
    assert "1 summarised" in third.stderr
    again = read_records(out)
    assert sorted(r["path"] for r in again) == sorted(inputs)  # one record per file, the stale one replaced


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["1", "3"])
def test_kill_in_the_middle_then_resume(tmp_path, parallel):
    files = make_files(tmp_path, 6)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "selfextend_local.cli", "summarize", *map(str, files), "--out", str(out), *FAST]
    cmd += ["--parallel", parallel]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_records(out)
    assert 2 <= len(partial) < 6
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    records = read_records(out)
    assert sorted(r["path"] for r in records) == sorted(map(str, files))
    assert all(r["error"] is None for r in records)


def test_torn_last_line_is_repaired(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "a", "error": None}) + "\n" + '{"path": "b", "summ')
    with RecordLog(out) as log:
        assert [r["path"] for r in log.records] == ["a"]
    assert read_records(out) == [{"path": "a", "error": None}]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["1", "2"])
def test_long_file_goes_in_parts(tmp_path, parallel):
    path = tmp_path / "long.txt"
    path.write_text(pydoc_text()[:6000])
    out = tmp_path / "out.jsonl"
    result = run("summarize", str(path), "--out", str(out), "--ctx", "512", "--parallel", parallel, *FAST)
    assert result.exit_code == 0, result.output
    (record,) = read_records(out)
    assert record["method"] == "parts" and record["parts"] >= 3 and record["summary"]


def test_custom_prompt_and_bad_prompt(tmp_path):
    (path,) = make_files(tmp_path, 1)
    out = tmp_path / "out.jsonl"
    ok = run("summarize", str(path), "--out", str(out), "--prompt", "List three keywords of:\n{text}", *FAST)
    assert ok.exit_code == 0 and read_records(out)[0]["settings"]["prompt"].startswith("List three")
    bad = run("summarize", str(path), "--out", str(out), "--prompt", "no placeholder")
    assert bad.exit_code == 1 and "must contain {text}" in bad.stderr


def cli_cmd(files, out, *extra):
    cmd = [sys.executable, "-m", "selfextend_local.cli", "summarize", *map(str, files), "--out", str(out)]
    return cmd + [*FAST, *extra]


def test_a_link_to_the_log_is_locked_as_the_log(tmp_path):
    """`--out link.jsonl` where link.jsonl -> out.jsonl is the same log: the second run is refused."""
    (path,) = make_files(tmp_path, 1)
    out = tmp_path / "out.jsonl"
    out.write_text("")
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    with RecordLog(out):  # a run holds the log
        busy = run("summarize", str(path), "--out", str(link), *FAST)
    assert busy.exit_code == 1 and "in use" in busy.stderr
    done = run("summarize", str(path), "--out", str(link), *FAST)
    assert done.exit_code == 0, done.output
    assert link.is_symlink() and len(read_records(out)) == 1  # written through the link, the link kept


SCHEMA = {  # bounded lengths: a small model's strings run on, and the grammar then never closes them
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 80},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
    },
    "required": ["topic", "keywords"],
}


@pytest.mark.parametrize("parallel", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_schema_makes_each_summary_a_valid_object(tmp_path, parallel):
    import jsonschema

    files = make_files(tmp_path, 2)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    out = tmp_path / "out.jsonl"
    args = ["--schema", str(schema), "--temperature", "0", "-n", "160", "--parallel", parallel]
    done = run("summarize", *map(str, files), "--out", str(out), *args)
    assert done.exit_code == 0, done.output
    records = read_records(out)
    assert len(records) == 2 and all(r["error"] is None for r in records)
    for record in records:
        jsonschema.validate(record["summary"], SCHEMA)  # stored parsed, not as text
        assert record["settings"]["schema"] == SCHEMA
    again = run("summarize", *map(str, files), "--out", str(out), *args)
    assert "2 already done" in again.stderr


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"type": "object", "properties": {"x": {"$ref": "#/missing"}}}), "cannot be turned into a grammar"),
    ],
)
def test_a_schema_that_cannot_be_used_is_one_line(tmp_path, content, fragment):
    (path,) = make_files(tmp_path, 1)
    schema = tmp_path / "schema.json"
    schema.write_text(content)
    result = run("summarize", str(path), "--out", str(tmp_path / "o.jsonl"), "--schema", str(schema), *FAST)
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "string", "pattern": "^\\x00$"}, "allows no token"),  # aborted the process: no records
        pytest.param(
            {"allOf": [{"type": "string", "maxLength": 10}, {"type": "integer"}]},
            "does not validate",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_summary_that_cannot_follow_its_schema_is_an_error_record(tmp_path, schema, fragment):
    files = make_files(tmp_path, 2)
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    out = tmp_path / "out.jsonl"
    done = run(
        "summarize", *map(str, files), "--out", str(out), "--schema", str(path), "--temperature", "0", "-n", "24"
    )
    records = read_records(out)
    assert done.exit_code == 1 and len(records) == 2, done.output
    assert all(r["summary"] is None and fragment in r["error"] for r in records)
    assert "Traceback" not in done.output
