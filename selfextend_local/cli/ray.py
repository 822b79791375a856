"""``summarize --ray``: the driver's side of a Ray run (parsing the address, joining, reporting)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ..errors import BadInputError
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


def summarize_on_ray(
    address,
    workers,
    gpus,
    files,
    out: Path,
    template,
    retry_failed,
    parallel,
    model,
    runtime,
    extend,
    sampling,
    report,
) -> None:
    from .. import distributed
    from ..records import RecordLog
    from ..summarize import plan_files

    address = check_address(address)
    threads_given = (
        click.get_current_context().get_parameter_source("threads") == click.core.ParameterSource.COMMANDLINE
    )
    threads = runtime.threads if threads_given else 1
    job = distributed.Job(
        model,
        extend,
        sampling,
        template,
        threads,
        runtime.gpu_layers,
        runtime.batch,
        runtime.kv_type,
        runtime.ctx,
        parallel,
    )
    with RecordLog(out) as record_log:
        ray = distributed.connect(address)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            workers = workers or max(1, cpus // threads)
            log(f"Ray: {workers} workers x {threads} threads on a cluster of {cpus} CPUs")
            signature = distributed.signature_for(ray, job)
            todo = plan_files(signature, list(files), record_log, retry_failed)
            note(f"{len(todo)} of {len(files)} files to summarise")
            records = distributed.run_on_ray(ray, job, todo, signature, workers, gpus)
            report(records, record_log, files, len(todo), out)
        finally:
            ray.shutdown()
