"""A long reading checkpointed as it goes, resumed after any interruption in exactly the state an
uninterrupted reading reaches (the real model, SelfExtend across grouping steps, f16 and q8_0 caches), and
checkpoints that cannot be trusted or written never in the way."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import GPU_LAYERS, make_session

from selfextend_local.engine.checkpoint import Checkpoints
from selfextend_local.engine.errors import Interrupted
from selfextend_local.engine.kvcache import KVCache
from selfextend_local.engine.metrics import kl_divergence
from selfextend_local.engine.settings import RuntimeSettings

N_TOKENS = 1100  # grouping (G4, W256) begins with the second chunk of 256; resumed at 768, it crosses more
CHUNK = 256


def session(model, kv_type: str = "f16"):
    runtime = RuntimeSettings(kv_type=kv_type, batch=CHUNK, gpu_layers=GPU_LAYERS)
    return make_session(model, runtime, 1280, group=4, window=256)


def read(model, kv_type: str, tokens, checkpoints=None, stop_at: int | None = None) -> np.ndarray:
    """The logits after the last token of ``tokens``, read in one session (Interrupted when stopped)."""
    done = [0]
    with session(model, kv_type) as s:
        s.ingest(
            tokens,
            progress=lambda d, _: done.__setitem__(0, d),
            should_stop=(lambda: done[0] >= stop_at) if stop_at else None,
            checkpoints=checkpoints,
        )
        return s.last_logits()


@pytest.fixture(scope="module")
def doc(pydoc_tokens):
    return list(pydoc_tokens[:N_TOKENS])


@pytest.mark.parametrize("kv_type", [pytest.param("f16", marks=pytest.mark.slow), "q8_0"])
def test_a_stopped_reading_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(model, doc, tmp_path, kv_type):
    want = read(model, kv_type, doc)
    cache = KVCache(tmp_path / "kv")
    first = Checkpoints(cache, doc, every=3600)  # none due: the stop itself writes the one kept
    with pytest.raises(Interrupted):
        read(model, kv_type, doc, first, stop_at=3 * CHUNK)
    assert first.written == 3 * CHUNK and len(cache.entries()) == 1
    resumed = []
    second = Checkpoints(cache, doc, every=0, on_restore=lambda done, total: resumed.append((done, total)))
    got = read(model, kv_type, doc, second)
    assert resumed == [(3 * CHUNK, N_TOKENS)]
    assert kl_divergence(want, got) <= 1e-6 and int(np.argmax(got)) == int(np.argmax(want))
    assert cache.entries() == []  # the reading is done: its checkpoint is gone


@pytest.fixture(scope="module")
def written(model, doc, tmp_path_factory):
    """A cache holding this document's checkpoint at 2 chunks (written after every chunk, each write
    replacing the one before), and another reading's."""
    cache = KVCache(tmp_path_factory.mktemp("written") / "kv")
    checkpoints = Checkpoints(cache, doc, every=0)
    with pytest.raises(Interrupted):
        read(model, "f16", doc, checkpoints, stop_at=2 * CHUNK)
    (ours,) = cache.entries()
    other = doc[:CHUNK] + doc[CHUNK + 1 :] + doc[CHUNK : CHUNK + 1]  # the same length, another reading
    with pytest.raises(Interrupted):
        read(model, "f16", other, Checkpoints(cache, other, every=3600), stop_at=CHUNK)
    theirs = next(e for e in cache.entries() if e.path != ours.path)
    assert ours.meta["n_tokens"] == 2 * CHUNK and ours.meta["of"] == N_TOKENS
    assert checkpoints.bytes_written > 0 and checkpoints.write_seconds > 0
    return cache.root, ours.path.name, theirs.path.name


def restore_from(model, doc, folder, tmp_path) -> tuple[Checkpoints, int, int]:
    """Restore into a fresh session from a copy of ``folder``: the checkpoints, tokens held, tokens restored."""
    cache = KVCache(tmp_path / "kv")
    shutil.copytree(folder, cache.root)
    checkpoints = Checkpoints(cache, doc, every=3600)
    with session(model) as s:
        restored = checkpoints.restore(s)
        return checkpoints, len(s.tokens), restored


def test_a_good_checkpoint_restores(model, doc, written, tmp_path):
    checkpoints, held, restored = restore_from(model, doc, written[0], tmp_path)
    assert held == restored == 2 * CHUNK and checkpoints.warnings == []


def _damage(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.parametrize("spoil", [_damage, _truncate], ids=["damaged", "truncated"])
def test_a_spoilt_checkpoint_is_discarded_with_one_warning(model, doc, written, tmp_path, spoil):
    folder, ours, _ = written
    spoilt = tmp_path / "spoilt"
    shutil.copytree(folder, spoilt)
    spoil(spoilt / ours)
    checkpoints, held, restored = restore_from(model, doc, spoilt, tmp_path)
    assert held == restored == 0 and len(checkpoints.warnings) == 1, checkpoints.warnings
    assert "damaged" in checkpoints.warnings[0] and not (tmp_path / "kv" / ours).exists()


def test_another_readings_checkpoint_in_its_place_is_not_used(model, doc, written, tmp_path):
    folder, ours, theirs = written
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    shutil.copy(swapped / theirs, swapped / ours)
    checkpoints, held, restored = restore_from(model, doc, swapped, tmp_path)
    assert held == restored == 0 and "another document" in " ".join(checkpoints.warnings)


def test_a_foreign_file_named_like_the_checkpoint_is_left_alone(model, doc, written, tmp_path):
    folder, ours, _ = written
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    (foreign / ours).write_bytes(b"somebody else's file")
    checkpoints, held, restored = restore_from(model, doc, foreign, tmp_path)
    assert held == restored == 0 and "left it alone" in " ".join(checkpoints.warnings)
    assert (tmp_path / "kv" / ours).read_bytes() == b"somebody else's file"


def test_a_checkpoint_of_another_model_build_or_setting_is_not_found(model, doc, written, tmp_path):
    folder, ours, _ = written
    cache = KVCache(tmp_path / "kv")
    shutil.copytree(folder, cache.root)
    checkpoints = Checkpoints(cache, doc, every=3600)
    with make_session(model, RuntimeSettings(batch=CHUNK), 1792, group=8, window=256) as s:  # another group
        assert checkpoints.restore(s) == 0 and len(s.tokens) == 0 and checkpoints.warnings == []
    assert (cache.root / ours).exists()  # it is still the other setting's


def test_a_cache_that_cannot_be_written_leaves_the_reading_going_with_one_warning(model, doc, tmp_path):
    blocked = tmp_path / "kv"
    blocked.write_text("a file where the cache's folder should be")
    checkpoints = Checkpoints(KVCache(blocked / "kv"), doc[: 3 * CHUNK], every=0)
    read(model, "f16", doc[: 3 * CHUNK], checkpoints)
    assert checkpoints.broken and len(checkpoints.warnings) == 1, checkpoints.warnings
    assert "without checkpoints" in checkpoints.warnings[0]
