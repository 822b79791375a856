"""Long English text for benchmarks, tests and defaults: Python's pydoc topic help, pinned in the package.

``selfextend_local/data/pydoc_topics.txt`` is ``pydoc_data.topics`` of CPython 3.11.7, its topics joined in sorted order
(465,126 characters). It is pinned because each Python release changes that text, and with it every
figure measured on it (the 12k long-context result moved from 1.20 to 1.43 of plain 6k-8k on 3.12).
Source and licence: data/README.md.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def pydoc_text() -> str:
    """About 465k characters of English prose and examples (the pinned pydoc topics)."""
    return resources.files("selfextend_local").joinpath("data").joinpath("pydoc_topics.txt").read_text("utf-8")


def long_tokens(model, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of the pydoc text (with the model's BOS if it wants one)."""
    tokens = model.tokenize(pydoc_text())
    if len(tokens) < n_tokens:
        raise ValueError(f"the pydoc text has only {len(tokens)} tokens for this model")
    return tokens[:n_tokens]
