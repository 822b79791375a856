"""Per-token negative log-likelihood of a text under a session, computed chunk by chunk."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..engine.metrics import token_nll
from ..engine.session import Session
from ..engine.slots import Progress
from ..extras import pyplot


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


def bucket_ppl(nll: np.ndarray, bucket: int) -> list[tuple[int, int, float]]:
    """(start, stop, perplexity) for consecutive buckets of target positions (token index of the target)."""
    out = []
    for start in range(0, len(nll), bucket):
        part = nll[start : start + bucket]
        out.append((start + 1, start + 1 + len(part), float(np.exp(part.mean()))))
    return out


def compare_methods(
    model,
    tokens: Sequence[int],
    methods: list[str],
    group: int,
    window: int,
    runtime,
    bucket: int = 2048,
    progress_for=None,
) -> dict:
    """Overall and per-bucket perplexity of ``tokens`` under each method, all at the same length."""
    from .baselines import Setting, describe, open_method

    setting = Setting(len(tokens), group, window)
    report = {"tokens": len(tokens), "bucket": bucket, "group": group, "window": window, "methods": {}}
    for method in methods:
        with open_method(model, method, setting, runtime) as session:
            nll = token_nlls(session, tokens, progress_for(method) if progress_for else None)
        report["methods"][method] = {
            "label": describe(method, setting),
            "ppl": float(np.exp(nll.mean())),
            "buckets": [{"start": a, "stop": b, "ppl": p} for a, b, p in bucket_ppl(nll, bucket)],
        }
    return report


def ppl_rows(report: dict) -> list[list[str]]:
    methods = report["methods"]
    first = next(iter(methods.values()))
    spans = [f"{b['start']}-{b['stop']}" for b in first["buckets"]]
    rows = [["method", "overall", *spans]]
    for m in methods.values():
        rows.append([m["label"], f"{m['ppl']:.2f}", *[f"{b['ppl']:.2f}" for b in m["buckets"]]])
    return rows


def ppl_csv(report: dict) -> str:
    lines = ["method,start,stop,ppl"]
    for name, m in report["methods"].items():
        lines.append(f"{name},0,{report['tokens']},{m['ppl']:.4f}")
        lines += [f"{name},{b['start']},{b['stop']},{b['ppl']:.4f}" for b in m["buckets"]]
    return "\n".join(lines) + "\n"


def ppl_plot(report: dict, path: str) -> None:
    """Perplexity against position, one line a method."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in report["methods"].values():
        xs = [(b["start"] + b["stop"]) / 2 for b in m["buckets"]]
        ax.plot(xs, [b["ppl"] for b in m["buckets"]], marker="o", label=m["label"])
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens, bucket centre)")
    ax.set_ylabel(f"perplexity per {report['bucket']}-token bucket")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Perplexity over {report['tokens']:,} tokens")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
