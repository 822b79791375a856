"""Next-token logits of our flash-attention kernels (patches/0003, 0005) against the stock one, on the same cache.

Every cached token is written by the stock kernel; at each of --positions positions the next token's
logits are taken with each kernel (switched by the environment, read at every op: the stock kernel is the
per-row one, GGML_CPU_FA_CONVERT=0, for a quantized cache and llama.cpp's own tiles, GGML_CPU_FA_KERNEL=tiled,
for f16 and f32; ours is the build's default, --ours-kernel picks another), as a one-token decode (the split
decode) and as the first row of a 64-token prefill (the GQA tiles of patch 0005), and compared by KL.
The floor beside it: llama.cpp's own two paths on an f16 cache (untouched by the patch), the same token
as a decode and as a prefill's first row. Run on the bundled model (Q4_1 weights: their activations are
quantized to q8_1, so a float difference anywhere flips roundings) and on its F16 dequantization (made
once with gguf-py, in --workdir), where the kernel's own difference shows.

    python scripts/fa_kernel_kl.py            # about five minutes on two cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from selfextend_local.engine.metrics import kl_divergence
from selfextend_local.engine.planning import Plan, align_cells
from selfextend_local.engine.session import Session
from selfextend_local.engine.settings import RuntimeSettings
from selfextend_local.evaluation.convert import rewrite_gguf
from selfextend_local.locate import load_model
from selfextend_local.paths import bundled_model
from selfextend_local.tasks.corpus import long_tokens

CACHE, BATCH = 1200, 64


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    return float(kl_divergence(p_logits, q_logits))


def use(kernel: str, kv: str) -> None:
    """Switch flash attention to the stock kernel (``"0"``) or ours (``"1"``, as --ours-kernel says)."""
    if kernel == "0":
        os.environ.update({"GGML_CPU_FA_CONVERT": "0", "GGML_CPU_FA_KERNEL": "tiled"})
        if kv not in ("f16", "f32"):
            return
    os.environ["GGML_CPU_FA_CONVERT"] = "1"
    os.environ["GGML_CPU_FA_KERNEL"] = OURS[0] if kernel == "1" else "tiled"


OURS = ["gqa"]  # GGML_CPU_FA_KERNEL of "ours" (--ours-kernel)


def first_logits(session: Session, tokens: list[int], kernel: str) -> np.ndarray:
    """The logits of the first of ``tokens`` read after the cache with ``kernel``; the cache left as it was."""
    use(kernel, session.runtime.kv_type)
    n, rows = len(session.tokens), []
    session.ingest(tokens, on_logits=lambda offset, r: rows.append(np.array(r[0])) if offset == 0 else None)
    session.truncate(n)
    return rows[0]


def compare(model, kv: str, positions: int) -> dict[str, list[float]]:
    tokens = long_tokens(model, CACHE + positions + BATCH)
    plan = Plan(1, 2048, "neighbor", "auto", align_cells(len(tokens) + 8), model.info.n_ctx_train, "kl")
    out: dict[str, list[float]] = {"decode": [], "prefill": [], "floor": []}
    with Session(model, plan, RuntimeSettings(kv_type=kv)) as session:
        use("0", kv)
        session.ingest(tokens[:CACHE])
        for at in range(CACHE, CACHE + positions):
            one, many = tokens[at : at + 1], tokens[at : at + BATCH]
            stock_one, stock_many = first_logits(session, one, "0"), first_logits(session, many, "0")
            out["decode"].append(kl(stock_one, first_logits(session, one, "1")))
            out["prefill"].append(kl(stock_many, first_logits(session, many, "1")))
            out["floor"].append(kl(stock_one, stock_many))
            use("0", kv)
            session.ingest(one)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="f16,q8_0,bf16,q5_0,q4_0,iq4_nl")
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--ours-kernel", default="gqa", help="GGML_CPU_FA_KERNEL of ours: gqa (0005) or tiled")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "selfextend-local" / "kl")
    parser.add_argument("--json", type=Path, default=None, help="write the figures (docs/fa_kernel_kl.json)")
    args = parser.parse_args()
    OURS[0] = args.ours_kernel
    f16_weights = args.workdir / "SmolLM2-135M-Instruct-F16.gguf"
    if not f16_weights.exists():
        args.workdir.mkdir(parents=True, exist_ok=True)
        rewrite_gguf(bundled_model(), f16_weights, to_f16=True)
    table: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'weights':<8} {'cache':<7} {'decode KL':>10} {'prefill KL':>11} {'floor KL':>9}   (means over positions)")
    for weights, path in (("Q4_1", None), ("F16", f16_weights)):
        model = load_model(path)
        for kv in args.types.split(","):
            got = {k: float(np.mean(v)) for k, v in compare(model, kv, args.positions).items()}
            table.setdefault(weights, {})[kv] = got
            print(
                f"{weights:<8} {kv:<7} {got['decode']:>10.2e} {got['prefill']:>11.2e} {got['floor']:>9.2e}", flush=True
            )
        model.close()
    print("\ndecode/prefill: ours against stock, the same token on the same cache; floor: llama.cpp's decode")
    print("against its own prefill's first row with the stock kernel")
    if args.json:
        setup = {"date": time.strftime("%Y-%m-%d"), "cache": CACHE, "positions": args.positions, "ours": OURS[0]}
        args.json.write_text(json.dumps({**setup, "mean_kl": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
