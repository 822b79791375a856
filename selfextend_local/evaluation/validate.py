"""Quantized model against a reference (e.g. F16): same prompts, same SelfExtend settings, compared
token by token. Mean and 99th-percentile KL, top-1 agreement, perplexity ratio, pass-key agreement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..engine.errors import BadInputError, Name
from ..engine.generate import generate
from ..engine.metrics import kl_divergence, token_nll
from ..engine.model import Model
from ..engine.planning import Plan, align_cells
from ..engine.session import Session
from ..engine.settings import RuntimeSettings, SamplingSettings
from ..engine.slots import Progress
from . import passkey as pk
from .baselines import default_setting


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
        reasons.append(f"mean KL {stats['mean_kl']:.4f} > max_kl {thresholds.max_kl}")
    if stats["top1_agreement"] < thresholds.min_top1:
        reasons.append(f"top-1 agreement {stats['top1_agreement']:.3f} < min_top1 {thresholds.min_top1}")
    return reasons


REPORTED = ("mean_kl", "p99_kl", "top1_agreement", "ppl_candidate", "ppl_reference", "ppl_ratio", "passkey_agreement")


def check_same_model(candidate: Model, reference: Model) -> None:
    if candidate.info.architecture != reference.info.architecture or candidate.n_vocab != reference.n_vocab:
        raise BadInputError(
            "{model} and {reference} are different models (architecture or vocabulary differ)",
            param="reference",
            model=Name("model"),
            reference=Name("reference"),
        )


def passkey_agreement(
    candidate: Model, reference: Model, plan: Plan, runtime: RuntimeSettings, length: int, trials: int
) -> float | None:
    """The share of pass-key prompts of ``length`` tokens both models answer alike (greedy), or None."""
    agree = []
    sampling = SamplingSettings(temperature=0, max_tokens=8)
    for seed in range(trials):
        trial = pk.Trial("digits", length, (seed + 0.5) / trials, seed, pk.make_key("digits", seed))
        prompt = pk.trial_tokens(reference, trial)
        cells = align_cells(len(prompt) + sampling.max_tokens)
        one = Plan(plan.group, plan.window, plan.schedule, "auto", cells, plan.n_ctx_train, "validate")
        answers = []
        for model in (candidate, reference):
            with Session(model, one, runtime) as session:
                answers.append(generate(session, prompt, sampling)[0].strip())
        agree.append(answers[0] == answers[1])
    return sum(agree) / len(agree) if agree else None


def validate(
    candidate: Model,
    reference: Model,
    tokens: list[int],
    setting: tuple[int | None, int | None, str],
    runtime: RuntimeSettings,
    thresholds: Thresholds,
    passkey_trials: int = 2,
    progress: Progress | None = None,
) -> dict:
    """Both models over ``tokens`` (compared token by token) and on pass-key prompts, under the same
    SelfExtend ``setting`` (group, window, schedule; None: the family's): the report, with ``passed``."""
    check_same_model(candidate, reference)
    n = len(tokens)
    chosen = default_setting(reference, n, setting[0], setting[1])
    plan = Plan(chosen.group, chosen.window, setting[2], "auto", align_cells(n), reference.info.n_ctx_train, "validate")
    (arrays,) = compare_logits([candidate], reference, tokens, plan, runtime, progress)
    stats = summarize(arrays)
    stats["passkey_agreement"] = passkey_agreement(candidate, reference, plan, runtime, n, passkey_trials)
    reasons = verdict(stats, thresholds)
    return {
        "candidate": str(candidate.path),
        "reference": str(reference.path),
        "tokens": n,
        "group": plan.group,
        "window": plan.window,
        "schedule": plan.schedule,
        **stats,
        "max_kl": thresholds.max_kl,
        "min_top1": thresholds.min_top1,
        "passed": not reasons,
        "reasons": reasons,
    }
