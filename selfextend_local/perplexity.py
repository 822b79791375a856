"""Per-token negative log-likelihood of a text under a session, computed chunk by chunk."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import token_nll
from .session import Progress, Session


def token_nlls(session: Session, tokens: Sequence[int], progress: Progress | None = None) -> np.ndarray:
    """NLL of ``tokens[1:]``, each predicted from everything before it; ingests into a fresh session."""
    targets = np.asarray(tokens, dtype=np.int64)
    out = np.empty(len(tokens) - 1, dtype=np.float64)

    def take(offset: int, logits: np.ndarray) -> None:
        stop = min(offset + len(logits), len(tokens) - 1)
        if stop > offset:
            out[offset:stop] = token_nll(logits[: stop - offset], targets[offset + 1 : stop + 1])

    session.reset()
    session.ingest(tokens, progress, on_logits=take)
    return out
