"""`summarize --ray` on a real Ray: the local one `--ray` starts alone (the README's first use), a head made by
`ray start` (2 workers, 1 thread each), and a cluster of two nodes on this machine (`ray.cluster_utils`),
one of which goes away mid-run or lacks the model.

The cluster tests are in the slow set (each cluster's start-up costs seconds). The local test comes first:
`ray.init()` without an address joins a running cluster if there is one, and the fixture's starts later."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from selfextend_local.cli import main
from selfextend_local.testing import free_port, make_text_files

pytest.importorskip("ray")

ARGS = ["--temperature", "0", "-n", "24"]
FIELDS = {"path", "sha256", "settings", "summary", "prompt_tokens", "summary_tokens", "method", "parts", "plan"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head with 2 CPUs, its own (no token: the test's processes are its only clients); its address."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")  # for the commands the tests run
    cmd = [str(ray_bin), "start", "--head", "--num-cpus", "2", "--port", str(port), "--include-dashboard", "false"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_files(folder: Path, n: int, chars: int = 1200) -> list[Path]:
    return make_text_files(folder, n, chars, offset=20000)


def summarize_cmd(files, out, *extra) -> list[str]:
    cmd = [sys.executable, "-m", "selfextend_local.cli", "summarize", *map(str, files), "--out", str(out)]
    return cmd + [*ARGS, *extra]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_records(out: Path, n: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} records after {timeout} s (exit {proc.poll()})")


@pytest.mark.slow
def test_records_and_greedy_summaries_equal_a_local_run(tmp_path):
    """`--ray` with no address starts a Ray of its own for the run (it used to die at once: started on a
    helper thread, its processes got the parent-death signal when that thread ended)."""
    assert not Path("/tmp/ray/ray_current_cluster").exists(), "a Ray cluster is running: --ray would join it"
    files = make_files(tmp_path, 4)
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    # one thread, as each Ray worker: llama.cpp's sums split across threads round differently
    subprocess.run(summarize_cmd(files, local, "--threads", "1"), check=True, capture_output=True, timeout=600)
    done = subprocess.run(  # more workers than the cluster holds: cut to what it has, and said
        summarize_cmd(files, remote, "--ray", "--workers", "100"),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert done.returncode == 0, done.stderr
    assert "4 summarised (0 failed)" in done.stderr and "using 2" in done.stderr
    assert "Ray: 2 workers x 1 threads on a cluster of 2 CPUs" in done.stderr
    want = {r["path"]: r for r in records(local)}
    got = {r["path"]: r for r in records(remote)}
    assert set(got) == set(want)
    for path, record in got.items():
        assert set(record) == set(want[path]) and FIELDS <= set(record)
        assert record["summary"] == want[path]["summary"] and record["settings"] == want[path]["settings"]


@pytest.mark.slow
def test_a_worker_killed_mid_run_still_gives_every_file_one_record(tmp_path, ray_cluster):
    files = make_files(tmp_path, 8)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        summarize_cmd(files, out, "--ray", ray_cluster, "--workers", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_records(out, 1, proc)
    pattern = "MapBatches\\(SummaryWorker\\)"  # Ray names an actor's process after its class
    victims = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert victims, "no worker process to kill"
    os.kill(int(victims[0]), signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    got = records(out)
    assert sorted(r["path"] for r in got) == sorted(map(str, files))  # each exactly once
    assert all(r["error"] is None for r in got)


@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_with_no_duplicates(tmp_path, ray_cluster):
    files = make_files(tmp_path, 8)
    out = tmp_path / "out.jsonl"
    cmd = summarize_cmd(files, out, "--ray", ray_cluster, "--workers", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_records(out, 2, proc)
    proc.kill()
    proc.wait()
    partial = records(out)  # every line whole
    assert 2 <= len(partial) < 8
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    got = records(out)
    assert sorted(r["path"] for r in got) == sorted(map(str, files))
    assert f"{8 - len(partial)} summarised" in again.stderr


@pytest.mark.slow
def test_a_model_missing_on_the_workers_is_one_line(tmp_path, ray_cluster):
    files = make_files(tmp_path, 1)
    cmd = summarize_cmd(files, tmp_path / "out.jsonl", "--ray", ray_cluster, "-m", "/nowhere/model.gguf")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert re.search(r"on Ray node [\d.]+ \(node [0-9a-f]+\): model file not found: /nowhere/model\.gguf", errors[0])
    assert "Traceback" not in done.stderr


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a second node of 1 CPU each; on the second, the models folder is empty. Yields the
    cluster, the second node, and the model's name (found in the head's models folder only)."""
    from ray.cluster_utils import Cluster

    from selfextend_local.paths import MODELS_ENV, bundled_model

    here, there = tmp_path / "models-head", tmp_path / "models-other"
    here.mkdir()
    there.mkdir()
    (here / "smol-copy.gguf").symlink_to(bundled_model())
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "env_vars": {MODELS_ENV: str(here)}},
    )
    other = cluster.add_node(num_cpus=1, env_vars={MODELS_ENV: str(there)})
    try:
        yield cluster, other, "smol-copy"
    finally:
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


@pytest.mark.slow
def test_a_model_on_one_node_only_is_one_line_naming_the_other(tmp_path, two_nodes):
    cluster, other, name = two_nodes
    files = make_files(tmp_path, 2)
    done = subprocess.run(
        summarize_cmd(files, tmp_path / "out.jsonl", "--ray", cluster.address, "-m", name),
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert f"node {other.node_id[:8]}" in errors[0] and f"no model named '{name}'" in errors[0]
    out = tmp_path / "out.jsonl"
    assert "Traceback" not in done.stderr and not (out.exists() and out.read_text())


@pytest.mark.slow
def test_a_node_removed_mid_run_still_gives_every_file_one_record(tmp_path, two_nodes):
    cluster, other, _ = two_nodes
    files = make_files(tmp_path, 6)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        summarize_cmd(files, out, "--ray", cluster.address, "--workers", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_records(out, 1, proc)
    cluster.remove_node(other, allow_graceful=False)
    _, err = proc.communicate(timeout=600)
    got = records(out)
    assert sorted(r["path"] for r in got) == sorted(map(str, files)), err  # each exactly once
    # the files whose worker went with the node are summarised again by the node that is left
    assert proc.returncode == 0 and all(r["error"] is None for r in got), err


def test_an_argument_that_is_not_an_address(tmp_path):
    files = make_files(tmp_path, 2)  # --ray before the files takes the first one for its address
    args = ["summarize", "--ray", *map(str, files), "--out", str(tmp_path / "o.jsonl")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "is not an address" in result.stderr and "--ray=local" in result.stderr


def test_without_ray_installed_it_says_what_to_install(tmp_path, monkeypatch):
    files = make_files(tmp_path, 1)
    monkeypatch.setitem(sys.modules, "ray", None)
    result = CliRunner().invoke(main, ["summarize", *map(str, files), "--out", str(tmp_path / "o.jsonl"), "--ray"])
    assert result.exit_code == 2 and "pip install 'selfextend-local[ray]'" in result.stderr


def test_an_unreachable_address_is_one_line_within_the_timeout(tmp_path):
    files = make_files(tmp_path, 1)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    done = subprocess.run(
        summarize_cmd(files, tmp_path / "out.jsonl", "--ray", address, "--ray-timeout", "5"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and time.perf_counter() - start < 60
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and address in errors[0] and "ray start --head" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_an_address_that_answers_but_is_not_ray(tmp_path):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        done = subprocess.run(
            summarize_cmd(make_files(tmp_path, 1), tmp_path / "out.jsonl", "--ray", address, "--ray-timeout", "5"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
    assert done.returncode == 1 and "not as a Ray cluster" in done.stderr and "Traceback" not in done.stderr


def test_workers_beyond_the_cluster_are_clamped():
    from selfextend_local.cli.ray import plan_workers

    assert plan_workers(None, 2, 1) == (2, None)
    workers, said = plan_workers(100, 2, 1)
    assert workers == 2 and "--workers 100" in said and "the cluster has 2" in said
    assert plan_workers(1, 8, 2) == (1, None) and plan_workers(9, 8, 2)[0] == 4
