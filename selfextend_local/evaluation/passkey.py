"""The pass-key retrieval test of the SelfExtend paper, and a one-word needle variant.

A random key (five digits) or word is hidden at a chosen depth in repeated filler text; the model is
asked for it by plain completion and greedy decoding. Grids of lengths x depths x seeds x methods.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..engine.generate import generate
from ..engine.model import Model
from ..engine.settings import RuntimeSettings, SamplingSettings
from ..extras import pyplot
from .baselines import Setting, describe, open_method

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
VARIANTS = {
    "digits": (
        "The pass key is {key}. Remember it. {key} is the pass key. ",
        "\nWhat is the pass key? The pass key is",
    ),
    "word": (
        "The special magic word is {key}. Remember it. {key} is the special magic word. ",
        "\nWhat is the special magic word? The special magic word is",
    ),
}
WORDS = (
    "lantern",
    "harbour",
    "violet",
    "cactus",
    "meadow",
    "falcon",
    "pepper",
    "glacier",
    "saddle",
    "orchid",
    "copper",
    "thimble",
    "walnut",
    "anchor",
    "biscuit",
    "quartz",
)


@dataclass(frozen=True)
class Trial:
    variant: str
    length: int
    depth: float
    seed: int
    key: str


def make_key(variant: str, seed: int) -> str:
    rng = random.Random(seed)
    return str(rng.randint(10000, 99999)) if variant == "digits" else rng.choice(WORDS)


def trial_tokens(model: Model, trial: Trial) -> list[int]:
    """Intro, filler, the needle at ``depth``, more filler, the question: about ``length`` tokens."""
    needle, question = VARIANTS[trial.variant]
    head = model.tokenize(INTRO)
    fill = model.tokenize(FILLER, add_special=False)
    mid = model.tokenize(needle.format(key=trial.key), add_special=False)
    tail = model.tokenize(question, add_special=False)
    reps = max(1, (trial.length - len(head) - len(mid) - len(tail)) // len(fill))
    before = round(trial.depth * reps)
    return head + fill * before + mid + fill * (reps - before) + tail


def answered(output: str, key: str) -> bool:
    return key.lower() in output.lower()


def grid(lengths, depths, seeds, variants) -> list[Trial]:
    return [
        Trial(v, n, d, s, make_key(v, s * 1000 + i))
        for v in variants
        for n in lengths
        for i, d in enumerate(depths)
        for s in seeds
    ]


def run(
    model: Model,
    methods: list[str],
    trials: list[Trial],
    group: int,
    window: int,
    runtime: RuntimeSettings,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Every trial under every method; one session per method and length, reset between trials."""
    sampling = SamplingSettings(temperature=0, max_tokens=8)
    results = []
    for method in methods:
        for length in sorted({t.length for t in trials}):
            cases = [(t, trial_tokens(model, t)) for t in trials if t.length == length]
            longest = max(len(tokens) for _, tokens in cases)
            setting = Setting(longest + sampling.max_tokens, group, window)
            with open_method(model, method, setting, runtime) as session:
                for trial, tokens in cases:
                    session.reset()
                    output, _ = generate(session, tokens, sampling)
                    result = {
                        **asdict(trial),
                        "method": method,
                        "label": describe(method, setting),
                        "tokens": len(tokens),
                        "output": output.strip(),
                        "correct": answered(output, trial.key),
                    }
                    results.append(result)
                    if on_result:
                        on_result(result)
    return results


def accuracy_table(results: list[dict]) -> list[list[str]]:
    """Rows: method; columns: length; cells: correct/total."""
    lengths = sorted({r["length"] for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    rows = [["method", *[f"{n:,}" for n in lengths], "all"]]
    for m in methods:
        mine = [r for r in results if r["method"] == m]
        cells = []
        for n in lengths:
            at = [r for r in mine if r["length"] == n]
            cells.append(f"{sum(r['correct'] for r in at)}/{len(at)}")
        rows.append([mine[0]["label"] if mine else m, *cells, f"{sum(r['correct'] for r in mine)}/{len(mine)}"])
    return rows


def heatmap(results: list[dict], path: str) -> None:
    """The paper-style figure: one panel a method, depth by length, coloured by accuracy."""
    plt = pyplot()
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in results))
    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    fig, axes = plt.subplots(
        1,
        len(methods),
        figsize=(3.0 * len(methods) + 1.5, 3.6),
        squeeze=False,
        sharey=True,
        gridspec_kw={"wspace": 0.08},
    )
    for ax, method in zip(axes[0], methods):
        grid_ = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                cell = [r["correct"] for r in results if r["method"] == method and r["depth"] == d and r["length"] == n]
                if cell:
                    grid_[i, j] = sum(cell) / len(cell)
        image = ax.imshow(grid_, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_title(next(r["label"] for r in results if r["method"] == method), fontsize=9)
        ax.set_xticks(range(len(lengths)), [f"{n // 1000}k" if n >= 1000 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.tick_params(axis="y", labelleft=ax is axes[0][0])
        ax.set_xlabel("context length (tokens)")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid_[i, j]):
                    ax.text(j, i, f"{grid_[i, j]:.0%}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
    fig.suptitle("Pass-key retrieval")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
