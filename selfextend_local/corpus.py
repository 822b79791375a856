"""Long English text every Python has (the pydoc topic help), for benchmarks, tests and defaults."""

from __future__ import annotations


def pydoc_text() -> str:
    """About 465k characters of English prose and examples from ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def long_tokens(model, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of the pydoc text (with the model's BOS if it wants one)."""
    tokens = model.tokenize(pydoc_text())
    if len(tokens) < n_tokens:
        raise ValueError(f"the pydoc text has only {len(tokens)} tokens for this model")
    return tokens[:n_tokens]
