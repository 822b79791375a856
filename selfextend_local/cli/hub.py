"""``download`` and ``models``: fetch GGUF files from the hub, list the local ones."""

from __future__ import annotations

from pathlib import Path

import click

from .options import log_options


@click.command()
@click.argument("repo")
@click.option("--quant", "-q", default=None, help="Quantization to fetch, e.g. Q4_K_M (case does not matter).")
@click.option("--file", "file_name", default=None, help="Exact file name to fetch instead of a quantization.")
@click.option(
    "--dir",
    "dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder to download into. Default: the models folder.",
)
@log_options
def download(repo: str, quant: str | None, file_name: str | None, dest: Path | None, verbose: bool) -> None:
    """Download a GGUF model from REPO (OWNER/NAME) on the Hugging Face hub, verify it, and show its info.

    Split models (-00001-of-0000N) are fetched together; an interrupted transfer resumes. HF_TOKEN is used
    for gated repositories; with HF_HUB_OFFLINE=1 only already-downloaded files are used.
    """
    from ..engine.errors import BadInputError
    from ..engine.model import Model
    from ..hub import download as fetch
    from ..tasks.info import describe

    if quant and file_name:
        raise BadInputError("give --quant or --file, not both")
    path = fetch(repo, quant, file_name, dest)
    click.echo(str(path))
    with Model(path) as model:  # memory-mapped: cheap even for large files
        click.echo(describe(model))


@click.command()
@log_options
def models(verbose: bool) -> None:
    """List the local models (the bundled one and the models folder) with their key facts."""
    from ..engine.errors import SelfExtendError
    from ..engine.model import Model
    from ..paths import bundled_model, local_models, models_dir
    from ..tasks.info import format_table, human_size

    rows = [["model", "size", "quant", "architecture", "training context", "path"]]
    candidates = []
    try:
        candidates.append(("(bundled) " + bundled_model().name, bundled_model()))
    except SelfExtendError:
        pass
    root = models_dir()
    candidates += [(str(p.relative_to(root)), p) for p in local_models()]
    for name, path in candidates:
        try:
            with Model(path, vocab_only=True) as model:
                info = model.info
                rows.append(
                    [
                        name,
                        human_size(info.size_bytes),
                        info.quantization,
                        info.architecture,
                        f"{info.n_ctx_train:,}",
                        str(path),
                    ]
                )
        except SelfExtendError as exc:
            rows.append([name, human_size(path.stat().st_size), "?", "unreadable", "-", str(exc)])
    click.echo(format_table(rows, align_left=True))
    click.echo(f"\nmodels folder: {root}", err=True)
