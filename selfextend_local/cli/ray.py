"""``summarize --ray``: the driver's side of a Ray run (parsing the address, joining, reporting)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import click

from ..engine.errors import BadInputError
from .display import log, note

_ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.\-]+:\d+|\[[0-9a-fA-F:]+\]:\d+)$")


def check_address(address: str) -> str | None:
    """``local`` (start or join a local Ray) becomes None; anything not an address is refused, since
    ``--ray`` before the files would otherwise take the first file for an address."""
    if not _ADDRESS.match(address):
        raise BadInputError(
            f"--ray {address!r} is not an address (auto, HOST:PORT or ray://HOST:PORT); "
            "to start a local Ray, put --ray after the files or write --ray=local"
        )
    return None if address == "local" else address


def plan_workers(requested: int | None, cpus: int, threads: int) -> tuple[int, str | None]:
    """Workers to start on a cluster of ``cpus`` CPUs at ``threads`` each, and a line when the request
    was clamped (more workers than the cluster can place would wait for ever)."""
    fit = max(1, cpus // threads)
    if requested is None:
        return fit, None
    if requested > fit:
        need = requested * threads
        return fit, f"--workers {requested} x {threads} threads needs {need} CPUs; the cluster has {cpus}: using {fit}"
    return requested, None


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run goes: ``--ray ADDRESS``, ``--workers``, ``--gpus``, ``--ray-timeout``."""

    address: str
    workers: int | None
    gpus: float
    timeout: float


def summarize_on_ray(options: RayOptions, job, files, out: Path, retry_failed: bool, report) -> None:
    from ..serving import distributed
    from ..tasks.records import RecordLog
    from ..tasks.summarize import plan_files

    address = check_address(options.address)
    threads_given = (
        click.get_current_context().get_parameter_source("threads") == click.core.ParameterSource.COMMANDLINE
    )
    threads = job.runtime.threads if threads_given else 1
    job = replace(job, runtime=replace(job.runtime, threads=threads))
    with RecordLog(out) as record_log:
        ray = distributed.connect(address, options.timeout)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            workers, clamped = plan_workers(options.workers, cpus, threads)
            if clamped:
                log(clamped)
            log(f"Ray: {workers} workers x {threads} threads on a cluster of {cpus} CPUs")
            signature = distributed.signature_for(ray, job)
            todo = plan_files(signature, list(files), record_log, retry_failed)
            note(f"{len(todo)} of {len(files)} files to summarise")
            records = distributed.run_on_ray(ray, job, todo, signature, workers, options.gpus)
            report(records, record_log, files, len(todo), out)
        finally:
            ray.shutdown()
