"""What earlier readings said about the cost of reading (engine/paces.py), and the time left a prior gives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from selfextend_local.engine import paces
from selfextend_local.engine.eta import Clock
from selfextend_local.engine.paces import Pace, setup_of

A, B = 2e-3, 2e-7  # seconds a token, and a token per cell before it: a ratio of 1e-4


def slow_start(total: int = 32768, chunk: int = 512, slow: float = 1.5):
    """(done, seconds) of a reading whose chunks from 4% to 8% of it ran ``slow`` times slower (another
    process on the machine), the rest at the model's pace."""
    t, done, out = 0.0, 0, [(0, 0.0)]
    while done < total:
        n = min(chunk, total - done)
        took = A * n + B * (done * n + n * n / 2)
        t += took * (slow if 0.04 * total <= done < 0.08 * total else 1.0)
        done += n
        out.append((done, t))
    return out


def error_at(clock: Clock, points, share: float) -> float:
    total, end = points[-1][0], points[-1][1]
    for done, at in points:
        clock.mark(done, at)
        if done >= share * total:
            return (clock.seconds_left(done, total) - (end - at)) / (end - at)
    raise AssertionError("never reached")


def test_a_prior_ratio_keeps_the_time_left_right_after_a_slow_stretch():
    """Without a prior the slow stretch steepens the fitted slope; with the setup's ratio from earlier
    readings only the pace is averaged, and the time left at a quarter stays close."""
    points = slow_start()
    alone = error_at(Clock(), points, 0.25)
    primed = error_at(Clock(prior=B / A), points, 0.25)
    assert abs(alone) > 0.12  # (-16%; the shown estimate on a real 32k reading was +25.6% there)
    assert abs(primed) < 0.08  # (+6.4%)
    for share in (0.5, 0.75, 0.9):
        assert abs(error_at(Clock(prior=B / A), points, share)) < 0.10


def test_a_wrong_prior_gives_way_to_the_reading_as_it_goes():
    points = slow_start(slow=1.0)
    early, late = (abs(error_at(Clock(prior=3 * B / A), points, s)) for s in (0.25, 0.9))
    assert late < early and late < 0.05


def finished_reading(total: int = 16384) -> Clock:
    clock = Clock()
    t, done = 0.0, 0
    clock.mark(0, 0.0)
    while done < total:
        t += A * 512 + B * (done * 512 + 512 * 512 / 2)
        done += 512
        clock.mark(done, t)
    return clock


def test_a_finished_reading_leaves_its_ratio_and_the_next_starts_from_it(tmp_path):
    pace = Pace("setup", tmp_path / "paces.json")
    assert pace.prior() is None and pace.clock().prior is None
    pace.record(finished_reading(), 16384)
    assert pace.prior() == pytest.approx(B / A, rel=1e-6)
    assert Pace("setup", tmp_path / "paces.json").clock().prior == pytest.approx(B / A, rel=1e-6)
    assert Pace("another setup", tmp_path / "paces.json").prior() is None
    assert [p.name for p in tmp_path.iterdir()] == ["paces.json"]  # written through a temporary file, renamed


def test_short_and_unfinished_readings_leave_nothing(tmp_path):
    pace = Pace("setup", tmp_path / "paces.json")
    pace.record(finished_reading(4096), 4096)  # under MIN_TOKENS: its slope is noise
    pace.record(finished_reading(16384), 20000)  # stopped before its end
    pace.record(Clock(), 0)
    assert pace.prior() is None and not (tmp_path / "paces.json").exists()


def test_a_setup_keeps_its_newest_ratios_and_their_median(tmp_path):
    path = tmp_path / "paces.json"
    path.write_text(json.dumps({"setup": [1e-4, 9e-4, 2e-4, 3e-4, 4e-4]}))
    pace = Pace("setup", path)
    pace.record(finished_reading(), 16384)  # 1e-4 again: the oldest goes
    kept = json.loads(path.read_text())["setup"]
    assert len(kept) == paces.KEPT and kept[0] == 9e-4
    assert pace.prior() == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "content", [b"not json", b"[1, 2]", b'{"setup": "x"}', b'{"setup": [-1, "a", null]}', b"\xff\xfe", b""]
)
def test_a_damaged_file_is_no_prior_and_a_reading_replaces_it(tmp_path, content):
    path = tmp_path / "paces.json"
    path.write_bytes(content)
    pace = Pace("setup", path)
    assert pace.prior() is None
    pace.record(finished_reading(), 16384)
    assert pace.prior() == pytest.approx(B / A, rel=1e-6)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only folder")
def test_a_read_only_folder_is_no_error_and_loses_nothing(tmp_path):
    path = tmp_path / "paces.json"
    path.write_text(json.dumps({"setup": [5e-4]}))
    tmp_path.chmod(0o500)
    try:
        Pace("setup", path).record(finished_reading(), 16384)
        assert json.loads(path.read_text()) == {"setup": [5e-4]}
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_fifo_a_device_or_a_huge_file_is_no_prior_and_no_hang(tmp_path, monkeypatch, kind):
    path = tmp_path / "paces.json"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
    elif kind == "device":
        path = Path("/dev/zero")  # reading it would never end
    else:
        path.write_bytes(b" " * (paces.MAX_BYTES + 1))
    pace = Pace("setup", path)
    assert pace.prior() is None and pace.clock().prior is None
    if kind == "fifo":  # and a finished reading leaves what is there in place
        pace.record(finished_reading(), 16384)
        assert path.is_fifo() and [p.name for p in tmp_path.iterdir()] == ["paces.json"]


def test_a_folder_in_the_way_is_no_error(tmp_path):
    (tmp_path / "paces.json").mkdir()
    pace = Pace("setup", tmp_path / "paces.json")
    pace.record(finished_reading(), 16384)
    assert pace.prior() is None


def test_an_empty_setting_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(paces.PACES_ENV, "")
    pace = Pace("setup")
    pace.record(finished_reading(), 16384)
    assert pace.path is None and pace.prior() is None
    monkeypatch.setenv(paces.PACES_ENV, str(tmp_path / "here.json"))
    assert Pace("setup").path == tmp_path / "here.json"


def test_the_setup_is_what_the_ratio_depends_on(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    base = setup_of(model, "f16", 2, 16, 1024)
    assert base == setup_of(model, "f16", 2, 16, 1024)
    others = [
        setup_of(model, "q8_0", 2, 16, 1024),
        setup_of(model, "f16", 4, 16, 1024),
        setup_of(model, "f16", 2, 32, 1024),
        setup_of(model, "f16", 2, 16, 512),
    ]
    assert base not in others and len(set(others)) == 4


def test_a_reading_through_the_clis_bar_leaves_its_ratio_and_the_next_starts_from_it(
    model, pydoc_tokens, tmp_path, monkeypatch
):
    """The real engine reads a document with the CLI's progress (IngestProgress, as ``qa`` and ``generate``
    do); its setup's entry then holds the reading's ratio, and the next reading's clock starts from it."""
    from conftest import GPU_LAYERS, make_session

    from selfextend_local.cli.display import IngestProgress
    from selfextend_local.engine.paces import pace_of
    from selfextend_local.engine.settings import RuntimeSettings

    monkeypatch.setattr(paces, "MIN_TOKENS", 1024)  # a reading the suite can afford
    monkeypatch.setenv(paces.PACES_ENV, str(tmp_path / "paces.json"))
    tokens = list(pydoc_tokens[:1800])
    runtime = RuntimeSettings(batch=128, gpu_layers=GPU_LAYERS)
    with make_session(model, runtime, 2048, group=4, window=256) as session:
        pace = pace_of(session)
        progress = IngestProgress("reading document", pace=pace)
        assert progress.clock.prior is None
        session.ingest(tokens, progress)
    ratio = pace.prior()
    assert ratio is not None and ratio > 0
    assert json.loads((tmp_path / "paces.json").read_text()) == {pace.setup: [ratio]}
    assert IngestProgress("reading document", pace=pace).clock.prior == ratio
    with make_session(model, RuntimeSettings(kv_type="q8_0", batch=128, gpu_layers=GPU_LAYERS), 2048, 4, 256) as s:
        assert pace_of(s).prior() is None  # another KV type: another setup
