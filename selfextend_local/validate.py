"""Quantized model against a reference (e.g. F16): same prompts, same SelfExtend settings, compared
token by token. Mean and 99th-percentile KL, top-1 agreement, perplexity ratio, pass-key agreement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .metrics import kl_divergence, token_nll
from .model import Model
from .planning import Plan
from .session import Progress, Session
from .settings import RuntimeSettings


@dataclass(frozen=True)
class Thresholds:
    max_kl: float = 0.05
    min_top1: float = 0.90


def compare_logits(
    candidates: list[Model],
    reference: Model,
    tokens: Sequence[int],
    plan: Plan,
    runtime: RuntimeSettings,
    progress: Progress | None = None,
) -> list[dict[str, np.ndarray]]:
    """All models ingest ``tokens`` in lockstep, chunk by chunk; per candidate: per-token KL to the
    reference, top-1 match, and both NLLs (logits are never held for more than one chunk)."""
    targets = np.asarray(tokens[1:], dtype=np.int64)
    n = len(targets)
    out = [{k: np.empty(n) for k in ("kl", "top1", "nll_candidate", "nll_reference")} for _ in candidates]
    sessions = [Session(m, plan, runtime) for m in [reference, *candidates]]
    try:
        chunk = sessions[0].chunk
        logits: list[np.ndarray] = []
        for start in range(0, len(tokens), chunk):
            part = tokens[start : start + chunk]
            logits.clear()
            for session in sessions:
                session.ingest(part, on_logits=lambda off, lg: logits.append(lg))
            stop = min(start + len(part), n)
            if stop > start:
                ref = logits[0][: stop - start]
                ref_nll = token_nll(ref, targets[start:stop])
                for arrays, cand in zip(out, logits[1:]):
                    cand = cand[: stop - start]
                    arrays["kl"][start:stop] = kl_divergence(ref, cand)
                    arrays["top1"][start:stop] = cand.argmax(-1) == ref.argmax(-1)
                    arrays["nll_candidate"][start:stop] = token_nll(cand, targets[start:stop])
                    arrays["nll_reference"][start:stop] = ref_nll
            if progress:
                progress(min(start + len(part), len(tokens)), len(tokens))
    finally:
        for session in sessions:
            session.close()
    return out


def summarize(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        "mean_kl": float(arrays["kl"].mean()),
        "p99_kl": float(np.percentile(arrays["kl"], 99)),
        "top1_agreement": float(arrays["top1"].mean()),
        "ppl_candidate": float(np.exp(arrays["nll_candidate"].mean())),
        "ppl_reference": float(np.exp(arrays["nll_reference"].mean())),
        "ppl_ratio": float(np.exp(arrays["nll_candidate"].mean() - arrays["nll_reference"].mean())),
    }


def verdict(stats: dict[str, float], thresholds: Thresholds) -> list[str]:
    """Reasons the candidate fails (empty: it passes)."""
    reasons = []
    if stats["mean_kl"] > thresholds.max_kl:
        reasons.append(f"mean KL {stats['mean_kl']:.4f} > --max-kl {thresholds.max_kl}")
    if stats["top1_agreement"] < thresholds.min_top1:
        reasons.append(f"top-1 agreement {stats['top1_agreement']:.3f} < --min-top1 {thresholds.min_top1}")
    return reasons
