"""Which llama-cpp-python build is loaded: ours (built from the sdist with the patches in ``patches/``)
or a stock one. Standard library only: :mod:`selfextend_local.llama_build` uses it before anything else
is installed."""

from __future__ import annotations

LABEL = "selfextend.2"  # the local version label of our builds; bump when the patches change


def patch_level(version: str) -> int:
    """Which of our patch sets a build carries: 0 for a stock build, 1 for the seq_div fix alone, 2 with the
    quantized K-shift fix too."""
    _, _, label = version.partition("+selfextend.")
    return int(label) if label.isdigit() else 0
