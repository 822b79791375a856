"""What each KV cache type costs in quality on the bundled model, with and without SelfExtend: perplexity at
4k tokens with no extension (the type's own cost) and at 12k under G4 W2048 (beside what grouping and the
K-shifts of its keys add), against f16's, with this build's kernel (GGML_CPU_FA_CONVERT=0: the stock
flash-attention kernel on our build). Writes --json (what `info` and the README quote).

    python scripts/kv_quality.py --json docs/kv_quality.json       # about ten minutes on two cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

from selfextend_local.engine.planning import Plan, align_cells
from selfextend_local.engine.session import Session
from selfextend_local.engine.settings import RuntimeSettings
from selfextend_local.evaluation.perplexity import token_nlls
from selfextend_local.locate import load_model
from selfextend_local.tasks.corpus import long_tokens

CASES = {"4k, no extension": (4096, 1, 2048), "12k, G4 W2048": (12288, 4, 2048)}


def perplexity(model, kv: str, n: int, group: int, window: int) -> float:
    plan = Plan(group, window, "neighbor", "auto", align_cells(n), model.info.n_ctx_train, "kv_quality")
    with Session(model, plan, RuntimeSettings(kv_type=kv)) as session:
        return float(np.exp(token_nlls(session, long_tokens(model, n)).mean()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="f16,q8_0,q5_0,q4_0,iq4_nl")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = load_model()
    table: dict[str, dict[str, float]] = {}
    for case, (n, group, window) in CASES.items():
        for kv in args.types.split(","):
            table.setdefault(kv, {})[case] = round(perplexity(model, kv, n, group, window), 4)
            print(f"{case}, {kv}: {table[kv][case]}", file=sys.stderr, flush=True)
    base = table.get("f16")  # the ratios need f16 among --types
    print(f"\n{'type':<8}" + "".join(f"{case:>28}" for case in CASES))
    for kv, row in table.items():
        cells = "".join(f"{row[c]:>18.4f} ({row[c] / base[c] - 1 if base else 0:+7.2%})" for c in CASES)
        print(f"{kv:<8}{cells}")
    if args.json:
        kernel = "stock" if os.environ.get("GGML_CPU_FA_CONVERT") == "0" else "this build's"
        figures = {"date": time.strftime("%Y-%m-%d"), "llama_cpp": llama_cpp.__version__, "kernel": kernel}
        figures["perplexity"] = table
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
