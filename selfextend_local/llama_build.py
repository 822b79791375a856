"""Install llama-cpp-python built from its PyPI sdist with our llama.cpp fixes: native division
(``seq_div``'s K-shift sign), the K-shift of a quantized K cache, flash attention on a quantized KV
cache in tiles, and a K-shift of the moved cells only.

    python -m selfextend_local.llama_build        # in a clone, before `pip install -e .` (README)
    selfextend-local build-llama                  # after installing the tool from a wheel or with pipx

The sdist is fetched by pip (so pip's index settings apply), the patches in ``patches/`` are applied,
the package version gets a local label (``0.3.36+selfextend.7``: ``llama_cpp.__version__`` then says which
build, and which of the patches, is loaded), and pip builds the wheel, honouring ``CMAKE_ARGS`` (``-DGGML_CUDA=on``,
``-DGGML_METAL=on``) exactly as ``pip install llama-cpp-python`` does. The wheel is kept in a cache
keyed by the version, the patches, ``CMAKE_ARGS`` and the Python and platform, so a second install costs
seconds. If a patch does not apply (a newer llama-cpp-python), one line says so and the stock build is
installed: it still works, with division emulated by shifts and quantized K caches refused where their
K-shift would crash.

Only the standard library is used here: this runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

from .engine.build import LABEL

PACKAGE = "llama-cpp-python"
KNOWN_VERSION = "0.3.36"  # the release the patches were written against
CACHE_ENV = "SELFEXTEND_LOCAL_BUILD_CACHE"
_ENV_KEYS = ("CMAKE_ARGS", "FORCE_CMAKE", "CMAKE_GENERATOR", "CC", "CXX")


class BuildError(Exception):
    """The build could not be done; the message says what to do."""


def say(message: str) -> None:
    print(f"selfextend-local: {message}", file=sys.stderr, flush=True)


def patches() -> list[tuple[str, bytes]]:
    folder = resources.files(__package__).joinpath("patches")
    return sorted((p.name, p.read_bytes()) for p in folder.iterdir() if p.name.endswith(".patch"))


def cache_root() -> Path:
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "selfextend-local" / "llama-wheels"


def build_env() -> dict[str, str]:
    """The environment pip builds in: the user's, with llama-cpp-python's multimodal library (mtmd, for
    llava-style chat handlers, which selfextend-local never uses) left out unless CMAKE_ARGS asks for it:
    it is the largest part of the build."""
    args = os.environ.get("CMAKE_ARGS", "")
    if "LLAVA_BUILD" not in args:
        args = f"{args} -DLLAVA_BUILD=OFF".strip()
    return {**os.environ, "CMAKE_ARGS": args}


def cache_key(version: str) -> str:
    """What decides the wheel: the version, the patches, the build settings, this Python and platform."""
    digest = hashlib.sha256()
    for part in (version, LABEL, sys.implementation.name, platform.python_version(), platform.platform()):
        digest.update(part.encode() + b"\0")
    for name, data in patches():
        digest.update(name.encode() + b"\0" + data)
    env = build_env()
    for key in _ENV_KEYS:
        digest.update(f"{key}={env.get(key, '')}".encode() + b"\0")
    return digest.hexdigest()[:24]


def pip(*args: str, quiet: bool = True, log: Path | None = None, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    if log is None:
        return subprocess.run(cmd, capture_output=quiet, text=True, env=env)
    with log.open("w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)


def newest_version() -> str:
    """The release pip would install now, or the one the patches were written for if pip cannot say."""
    done = pip("index", "versions", PACKAGE, "--disable-pip-version-check")
    found = re.search(rf"{re.escape(PACKAGE)} \(([^)]+)\)", done.stdout or "")
    return found.group(1) if done.returncode == 0 and found else KNOWN_VERSION


def download_sdist(version: str, folder: Path) -> Path:
    say(f"fetching the {PACKAGE} {version} source distribution")
    done = pip("download", "--no-deps", "--no-binary", ":all:", f"{PACKAGE}=={version}", "-d", str(folder))
    found = sorted(folder.glob("*.tar.gz"))
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-5:])
        raise BuildError(f"pip could not download the {PACKAGE} {version} sdist:\n{tail}")
    return found[0]


def extract(sdist: Path, folder: Path) -> Path:
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:  # Python without tarfile filters: refuse members that would land outside the folder
            root = folder.resolve()
            for member in tar.getmembers():
                if not (folder / member.name).resolve().is_relative_to(root):
                    raise BuildError(f"{sdist.name} has a member outside its folder: {member.name}")
            tar.extractall(folder)
    (source,) = [p for p in folder.iterdir() if p.is_dir()]
    return source


def _patch_tool() -> list[str] | None:
    if shutil.which("patch"):
        return ["patch", "-p1", "--forward", "--batch", "--silent"]
    if shutil.which("git"):
        return ["git", "apply"]
    return None


def apply_patches(source: Path) -> str | None:
    """Apply the patches in order (a later one may build on an earlier one's lines); None when they all
    applied, else why not. The source is thrown away after a failure: the stock build comes from the
    index, not from it."""
    tool = _patch_tool()
    if tool is None:
        return "neither `patch` nor `git` is installed"
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(source.parent)}  # git must not look for a repository
    for name, data in patches():
        done = subprocess.run(tool, input=data, cwd=source, capture_output=True, env=env)
        if done.returncode != 0:
            return f"{name} does not apply"
    return None


def label_version(source: Path, version: str) -> str:
    """Give the build a local version label, so the installed package says it is ours."""
    init = source / "llama_cpp" / "__init__.py"
    text = init.read_text()
    labelled = f"{version}+{LABEL}"
    new, count = re.subn(r'__version__ = "[^"]+"', f'__version__ = "{labelled}"', text)
    if count != 1:
        raise BuildError(f"cannot find __version__ in {init}")
    init.write_text(new)
    return labelled


def build_wheel(source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    env = build_env()
    say(f"building it with our llama.cpp fixes (CMAKE_ARGS={env['CMAKE_ARGS']}); minutes on 2 cores; log: {log}")
    done = pip("wheel", "--no-deps", "--wheel-dir", str(out), str(source), log=log, env=env)
    wheels = sorted(out.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise BuildError(f"building {PACKAGE} failed (a C/C++ compiler and CMake are needed); end of {log}:\n{tail}")
    return wheels[-1]


def install(target: str, why: str) -> None:
    say(why)
    done = pip("install", target, quiet=False)
    if done.returncode != 0:
        raise BuildError(f"pip could not install {target}")


def install_patched(version: str | None = None, use_cache: bool = True) -> str:
    """Build (or take from the cache) and install the patched llama-cpp-python; returns what was installed."""
    version = version or newest_version()
    folder = cache_root() / cache_key(version)
    wheels = sorted(folder.glob("*.whl")) if use_cache else []
    if wheels:
        install(str(wheels[-1]), f"installing the patched {PACKAGE} {version} built earlier ({wheels[-1].name})")
        return wheels[-1].name
    with tempfile.TemporaryDirectory(prefix="selfextend-llama-") as tmp:
        source = extract(download_sdist(version, Path(tmp)), Path(tmp) / "src")
        problem = apply_patches(source)
        if problem:
            say(f"our llama.cpp fixes do not apply to {PACKAGE} {version} ({problem}); installing the stock build")
            install(f"{PACKAGE}=={version}", "division will be emulated by shifts (correct, slower on GPUs)")
            return f"{PACKAGE}=={version} (stock)"
        labelled = label_version(source, version)
        shutil.rmtree(folder, ignore_errors=True)
        wheel = build_wheel(source, folder)
    install(str(wheel), f"installing {PACKAGE} {labelled}")
    return wheel.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfextend_local.llama_build", description=__doc__.split("\n")[0])
    parser.add_argument("--version", default=None, help=f"{PACKAGE} release (default: the newest on the index)")
    parser.add_argument("--no-cache", action="store_true", help="build again even if a wheel is cached")
    args = parser.parse_args(argv)
    try:
        installed = install_patched(args.version, use_cache=not args.no_cache)
    except BuildError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    say(f"done: {installed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
