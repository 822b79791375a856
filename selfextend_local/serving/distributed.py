"""Batch summarisation beyond one machine, on Ray Data.

The driver (the ``summarize --ray`` process) reads and hashes the files, skips those already done by the
resume rules of a local run, ships each remaining file's text through a Ray Dataset, and stays the only
writer of the JSONL: each record is appended, whole, as it arrives. The work runs as
``Dataset.map_batches`` with a callable class on a pool of actors (:class:`SummaryWorker`): each actor
resolves the model spec on its own node (a path must exist there; ``REPO:QUANT`` downloads there), loads
the model once, and summarises the batches it is given, several files at once when ``--parallel`` asks.

Faults: an actor that dies is restarted by Ray and its batch retried (``max_restarts``,
``max_task_retries``); a file whose batch fails on every retry is skipped by Ray Data
(``max_errored_blocks``) and the driver gives it an error record; the run goes on. An interrupted driver
leaves a valid log, and the same command resumes it with no file lost or done twice.

This is the only module that imports Ray (the ``[ray]`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engine.errors import ModelError, Name, SelfExtendError
from ..engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from ..extras import require

RETRIES = 2  # attempts after the first for a batch whose actor died
WAVE_ATTEMPTS = 2  # passes over the files whose batches failed on every retry (a node lost mid-run)
WAVE_FILES = 256  # files shipped per Dataset: bounds what the driver and the object store hold at once


def import_ray():
    ray = require("ray", Name("ray"))
    require("ray.data", Name("ray"))
    return ray


@dataclass(frozen=True)
class Job:
    """What every worker needs to summarise like a local run would."""

    model: str | None
    extend: ExtendSettings
    sampling: SamplingSettings
    prompt: str
    runtime: RuntimeSettings
    parallel: int
    schema: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        sampling = dict(data["sampling"], stop=tuple(data["sampling"]["stop"]))
        return cls(
            data["model"],
            ExtendSettings(**data["extend"]),
            SamplingSettings(**sampling),
            data["prompt"],
            RuntimeSettings(**data["runtime"]),
            data["parallel"],
            data.get("schema"),
        )


def _where() -> str:
    import socket

    return socket.gethostname()


class SummaryWorker:
    """A Ray Data callable class: one per actor, the model loaded once, a batch of files per call."""

    def __init__(self, job: dict) -> None:
        from ..locate import load_model
        from ..tasks.summarize import Summarizer

        self.job = Job.from_dict(job)
        try:
            self.model = load_model(self.job.model, self.job.runtime)
        except SelfExtendError as exc:
            raise exc.located("on Ray worker {host}", host=_where()) from None
        job = self.job
        self.summarizer = Summarizer(self.model, job.extend, job.runtime, job.sampling, job.prompt, schema=job.schema)
        self.scheduler = None
        if self.job.parallel > 1:
            from ..engine import scheduler

            job = self.job
            self.scheduler = scheduler.Scheduler.create(self.model, job.runtime, job.extend, slots=job.parallel)

    def __call__(self, batch: dict) -> dict:
        from ..tasks.summarize import run

        texts = {str(p): t for p, t in zip(batch["path"], batch["text"])}
        todo = [(Path(p), d or None) for p, d in zip(batch["path"], batch["sha256"])]
        records = run(self.summarizer, todo, self.scheduler, reader=lambda path: texts[str(path)])
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}


def describe_model(job: dict) -> dict:
    """On a worker: the model's name and size (for the records' signature), or the error (its fields kept
    across the process boundary)."""
    from ..engine.model import Model
    from ..locate import resolve_model

    try:
        with Model(resolve_model(Job.from_dict(job).model), vocab_only=True) as model:
            return {"name": model.path.name, "size": model.info.size_bytes}
    except SelfExtendError as exc:
        return {"error": exc}


DEFAULT_CONNECT_TIMEOUT = 30.0  # seconds to reach a cluster (--ray-timeout)
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # and SETTINGS
_HOW_TO_START = "start one there with `ray start --head --port PORT`, or leave out the address for a local Ray"


def _host_port(address: str) -> tuple[str, int]:
    bare = address.removeprefix("ray://")
    host, _, port = bare.rpartition(":")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float) -> None:
    """One line, within ``timeout`` seconds, if nothing at ``address`` speaks gRPC (as a Ray head does):
    nothing listening, no answer, or a server of another kind."""
    import socket

    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_HTTP2_PREFACE)
            head = sock.recv(9)
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise SelfExtendError(
            "cannot reach a Ray cluster at {address} ({why}); {how}",
            param="ray",
            address=address,
            why=why,
            how=_HOW_TO_START,
        ) from None
    if len(head) < 9 or head[3] != 0x04:  # a gRPC server opens with an HTTP/2 SETTINGS frame
        raise SelfExtendError(
            "{address} answers, but not as a Ray cluster (no gRPC); check the address and port",
            param="ray",
            address=address,
        )


def connect(address: str | None, timeout: float = DEFAULT_CONNECT_TIMEOUT):
    """Join the Ray cluster at ``address`` (``auto``: the running one), or start (or join) a local one;
    a cluster that cannot be joined within ``timeout`` seconds is one line, not a hang."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network but the cluster's own
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address and address != "auto":
        check_reachable(address, timeout)
    kwargs = {"address": address} if address else {"include_dashboard": False}
    logging.getLogger("ray").setLevel(logging.ERROR)  # our progress lines say what a user needs
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # a batch given up on becomes an error record
    where = address or "a new local one"
    error = _init_within(ray, kwargs, timeout)
    if error is TimeoutError:
        raise SelfExtendError(
            "cannot join the Ray cluster at {address}: no answer within {seconds:g} s ({ray_timeout}); {how}",
            param="ray_timeout",
            address=where,
            seconds=timeout,
            ray_timeout=Name("ray_timeout"),
            how=_HOW_TO_START,
        )
    if error is not None:
        raise SelfExtendError(
            "cannot join the Ray cluster at {address}: {error}", param="ray", address=where, error=error
        )
    return ray


def _init_within(ray, kwargs: dict, timeout: float) -> str | type[TimeoutError] | None:
    """``ray.init``, given at most ``timeout`` seconds to join a cluster at an address; why it failed
    (TimeoutError when the time ran out), or None.

    A new local Ray is started on this thread, with no time limit but Ray's own: its GCS and raylet are
    started with a parent-death signal, which Linux sends when the *thread* that started them ends, so a
    local Ray started on a helper thread died the moment that thread did. Joining an address cannot hang
    on a dead one (:func:`check_reachable` ran first), but a half-alive head can: that join gets a helper
    thread and the time limit."""
    import threading

    outcome: list[str | None] = []

    def init() -> None:
        try:
            ray.init(log_to_driver=False, logging_level=logging.ERROR, **kwargs)
            outcome.append(None)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            text = str(exc).strip()
            outcome.append(text.splitlines()[0] if text else type(exc).__name__)

    if "address" not in kwargs:
        init()
        return outcome[0]
    thread = threading.Thread(target=init, name="ray-init", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return TimeoutError
    return outcome[0] if outcome else "ray.init failed"


NODE_CHECK_SECONDS = 120.0  # for every node to say whether it has the model


def signature_for(ray, job: Job) -> dict:
    """The records' signature, to skip files already done, after every node with CPUs has said that it has
    the model: a worker on a node without it would fail (and be restarted) for as long as the run lasts, so
    a model missing on one node is one line before any work. Each record still carries the signature of
    the model its worker loaded."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..tasks.summarize import make_signature

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise ModelError("the Ray cluster has no node with CPUs to run on")
    remote = ray.remote(num_cpus=0, max_retries=0)(describe_model)
    pending = [
        remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            job.as_dict()
        )
        for n in nodes
    ]
    found = ray.get(pending, timeout=NODE_CHECK_SECONDS)
    for node, answer in zip(nodes, found):
        if "error" in answer:
            where = {"address": node.get("NodeManagerAddress", "?"), "node": node["NodeID"][:8]}
            raise answer["error"].located("on Ray node {address} (node {node})", **where)
    first = found[0]
    return make_signature(first["name"], first["size"], job.extend, job.sampling, job.prompt, job.schema)


def _read(path: Path, digest: str | None) -> tuple[str | None, str | None]:
    """The text to ship, or the error its record gets (the driver reads every file)."""
    from ..tasks.documents import read_document

    try:
        return read_document(path), None
    except SelfExtendError as exc:
        return None, str(exc)


def run_on_ray(
    ray, job: Job, todo: list[tuple[Path, str | None]], signature: dict, workers: int, gpus: float
) -> Iterator[dict]:
    """Records of ``todo`` as they arrive from the workers; files Ray gave up on get an error record."""
    from ..tasks.summarize import finish_record, new_record

    context = ray.data.DataContext.get_current()
    context.max_errored_blocks = -1  # a batch that fails on every retry is skipped; its files get error records
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for start in range(0, len(todo), WAVE_FILES):
        items = []
        for path, digest in todo[start : start + WAVE_FILES]:
            text, error = _read(path, digest)
            if error is not None:
                yield finish_record(new_record(path, digest, signature), None, error, 0.0)
                continue
            items.append({"path": str(path), "sha256": digest or "", "text": text})
        for _ in range(WAVE_ATTEMPTS):
            if not items:
                break
            done = yield from _wave(ray, job, items, _workers_now(ray, workers, job.runtime.threads), gpus)
            items = [item for item in items if item["path"] not in done]
        for item in items:  # every attempt's batch failed on every retry
            error = f"its Ray worker was lost {WAVE_ATTEMPTS * (RETRIES + 1)} times (crashed, or its node went away)"
            record = new_record(Path(item["path"]), item["sha256"] or None, signature)
            yield finish_record(record, None, error, 0.0)


def _workers_now(ray, workers: int, threads: int) -> int:
    """The workers the cluster can place now (a node may have gone since the run began)."""
    cpus = int(ray.available_resources().get("CPU", 0) + 0.5) or int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(workers, cpus // max(threads, 1)))


def _wave(ray, job: Job, items: list[dict], workers: int, gpus: float):
    """One Ray Data pass over ``items``: yields each record as it arrives; returns the paths done."""
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // job.parallel))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing actor options here but has no other way to bound a batch's
        # retries; its default retries a batch that kills its worker for ever.
        warnings.simplefilter("ignore", DeprecationWarning)
        results = dataset.map_batches(
            SummaryWorker,
            fn_constructor_kwargs={"job": job.as_dict()},
            batch_size=job.parallel,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=job.runtime.threads,
            num_gpus=gpus or None,
            max_restarts=-1,
            max_task_retries=RETRIES,
        )
    done: set[str] = set()
    for row in results.iter_rows():
        record = json.loads(row["record"])
        if record["path"] not in done:
            done.add(record["path"])
            yield record
    return done
