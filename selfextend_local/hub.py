"""Downloading GGUF models through huggingface-hub: choose a quantization, fetch, verify.

The hub's address comes from ``HF_ENDPOINT``, the token from ``HF_TOKEN``, and ``HF_HUB_OFFLINE=1``
serves models already in the models folder. huggingface-hub draws the progress bar and resumes an
interrupted transfer from its ``.incomplete`` file; we check each file's SHA-256 against the hub's.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .engine.errors import BadInputError, ModelError, Name
from .paths import models_dir

SPLIT = re.compile(r"-(\d{5})-of-(\d{5})$")
QUANT = re.compile(r"(?:^|[-_.])((?:I?Q\d(?:_K)?(?:_[A-Z]+)?(?:_\d)?)|F16|BF16|F32|TQ\d_\d)(?=$|[-_.])", re.IGNORECASE)


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None

    @property
    def model_stem(self) -> str:
        """The file name without ``.gguf`` and without a ``-00001-of-00003`` split suffix."""
        return SPLIT.sub("", Path(self.path).name.removesuffix(".gguf"))

    @property
    def quant(self) -> str | None:
        found = QUANT.findall(self.model_stem)
        return found[-1].upper() if found else None


def endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def repo_dir(repo: str, dest: Path | None = None) -> Path:
    return (dest or models_dir()) / repo


def _hub_error(repo: str, exc: Exception) -> ModelError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return ModelError(
            "{repo} is gated: accept its terms on the hub and set HF_TOKEN to a token with access", repo=repo
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelError("repository {repo} was not found on the hub (if it is private, set HF_TOKEN)", repo=repo)
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelError("repository {repo} has no such revision", repo=repo)
    if isinstance(exc, errors.HfHubHTTPError):
        return ModelError("the hub refused the request for {repo}: {why}", repo=repo, why=str(exc).splitlines()[0])
    where = endpoint() or "huggingface.co"
    return ModelError(
        "cannot reach the hub at {where} ({why}); check the network, or set HF_HUB_OFFLINE=1",
        where=where,
        why=type(exc).__name__,
    )


REACH_TIMEOUT = 3.0  # seconds to wait for the hub's (or the proxy's) TCP handshake


def unreachable(url: str) -> str | None:
    """Why ``url``'s host (or the proxy for it) cannot be reached now, or None when it answers.

    huggingface-hub retries a dead network for about half a minute; one TCP handshake tells at once.
    """
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    target = urlsplit(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=REACH_TIMEOUT).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _check_reachable(repo: str) -> None:
    where = endpoint() or "https://huggingface.co"
    if reason := unreachable(where):
        raise ModelError(
            "cannot reach the hub at {where} for {repo} ({reason}); check the network, "
            "or set HF_HUB_OFFLINE=1 to use the models already downloaded",
            where=where,
            repo=repo,
            reason=reason,
        )


def list_gguf(repo: str, token: str | None = None) -> list[RemoteFile]:
    """The repository's GGUF files with their sizes and SHA-256 (for LFS files)."""
    from huggingface_hub import HfApi

    _check_reachable(repo)
    api = HfApi(endpoint=endpoint(), token=token or os.environ.get("HF_TOKEN"))
    try:
        entries = list(api.list_repo_tree(repo, recursive=True))
    except Exception as exc:  # every hub or network failure becomes one clear line
        raise _hub_error(repo, exc) from exc
    files = []
    for entry in entries:
        if getattr(entry, "size", None) is None or not entry.path.endswith(".gguf"):
            continue
        lfs = entry.lfs
        sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        files.append(RemoteFile(entry.path, entry.size, sha))
    return sorted(files, key=lambda f: f.path)


def _by_model(files: list[RemoteFile]) -> dict[str, list[RemoteFile]]:
    groups: dict[str, list[RemoteFile]] = {}
    for f in files:
        groups.setdefault(str(Path(f.path).parent / f.model_stem), []).append(f)
    return groups


def _choices(groups: dict[str, list[RemoteFile]]) -> str:
    return ", ".join(sorted({g[0].quant or Path(g[0].path).name for g in groups.values()}))


def _names_file(remote: RemoteFile, pattern: str) -> bool:
    """Whether ``pattern`` (a path, a file name or a glob such as ``*Q4_K_M.gguf``) names ``remote``."""
    name = Path(remote.path).name
    return pattern in (remote.path, name) or fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(remote.path, pattern)


def choose(files: list[RemoteFile], repo: str, quant: str | None = None, file: str | None = None) -> list[RemoteFile]:
    """The files to fetch (every part of a split model), or a one-line error that lists the choices."""
    groups = _by_model(files)
    if not groups:
        raise ModelError("{repo} has no .gguf files", repo=repo)
    if file:
        match = [g for g in groups.values() if any(_names_file(f, file) for f in g)]
        names = ", ".join(Path(g[0].path).name for g in match or groups.values())
        if not match:
            raise ModelError(
                "{repo} has no file {file!r}; its GGUF files: {names}", param="file", repo=repo, file=file, names=names
            )
        if len(match) > 1:
            raise BadInputError(
                "{file!r} matches several models in {repo} ({names}); give one file name",
                param="file",
                file=file,
                repo=repo,
                names=names,
            )
        return match[0]
    if quant:
        match = [g for g in groups.values() if (g[0].quant or "").upper() == quant.upper()]
        if not match:
            raise ModelError(
                "{repo} has no {quant} GGUF; available: {choices}",
                param="quant",
                repo=repo,
                quant=quant.upper(),
                choices=_choices(groups),
            )
    else:
        match = list(groups.values())
    if len(match) > 1:
        names = ", ".join(Path(g[0].path).name for g in match)
        what = f"several {quant.upper()} files" if quant else "several GGUF files"
        raise BadInputError(
            "{repo} has {what} ({names}); choose with {quant} ({choices}) or {file} NAME",
            param="quant",
            repo=repo,
            what=what,
            names=names,
            choices=_choices(groups),
            quant=Name("quant"),
            file=Name("file"),
        )
    return match[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(repo: str, remote: RemoteFile, target: Path, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        local = Path(hf_hub_download(repo, remote.path, local_dir=target, endpoint=endpoint(), token=token))
    except Exception as exc:
        raise _hub_error(repo, exc) from exc
    if remote.sha256 and sha256_of(local) != remote.sha256:
        local.unlink(missing_ok=True)
        raise ModelError(
            "checksum mismatch for {file} from {repo}: the file was removed; try again, and report it if it persists",
            file=remote.path,
            repo=repo,
        )
    return local


def local_matches(repo: str, quant: str | None, file: str | None, dest: Path | None = None) -> list[Path]:
    """Already-downloaded files of ``repo`` that satisfy the request (all parts of a split model)."""
    root = repo_dir(repo, dest)
    if not root.is_dir():
        return []
    files = [RemoteFile(str(p.relative_to(root)), p.stat().st_size, None) for p in root.rglob("*.gguf")]
    try:
        chosen = choose(files, repo, quant, file)
    except (ModelError, BadInputError):
        return []
    parts = [root / f.path for f in chosen]
    expected = SPLIT.search(Path(chosen[0].path).stem)
    if expected and len(parts) != int(expected.group(2)):
        return []
    return sorted(parts)


def download(
    repo: str, quant: str | None = None, file: str | None = None, dest: Path | None = None, token: str | None = None
) -> Path:
    """Fetch the chosen GGUF (every part of a split) into ``dest/REPO`` and return the first part."""
    if repo.count("/") != 1:
        raise BadInputError("{repo!r} is not a repository id; use OWNER/NAME", repo=repo)
    if offline():
        found = local_matches(repo, quant, file, dest)
        if not found:
            raise ModelError(
                "HF_HUB_OFFLINE is set and {repo} ({which}) is not in {folder}",
                repo=repo,
                which=quant or file or "any",
                folder=repo_dir(repo, dest),
            )
        return found[0]
    token = token or os.environ.get("HF_TOKEN")
    chosen = choose(list_gguf(repo, token), repo, quant, file)
    target = repo_dir(repo, dest)
    paths = [_fetch(repo, remote, target, token) for remote in chosen]
    return sorted(paths)[0]


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``owner/repo:QUANT`` -> (repo, quant)."""
    repo, _, quant = spec.partition(":")
    return repo, quant or None


def fetch_for_model_option(spec: str) -> Path:
    """``--model REPO:QUANT``: use the downloaded file if present, else download it first."""
    repo, quant = parse_spec(spec)
    found = local_matches(repo, quant, None)
    return found[0] if found else download(repo, quant)
