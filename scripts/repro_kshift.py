"""Minimal reproduction of llama.cpp's K-shift defects for quantized and bf16 K caches
(docs/UPSTREAM_KSHIFT_QUANT.md).

For each case: decode 600 tokens at positions 0..599 into a cache of that K type, shift them all by +1000
with llama_memory_seq_add, decode one more token at 1600, and compare its next-token distribution with a
cache of the same type decoded directly at 1000..1599 (the same relative positions): a correct shift gives
a KL at the level of the type's rounding. Each case runs in a subprocess of its own, so a crash is
reported as the signal that ended it.

    python scripts/repro_kshift.py [MODEL.gguf]     # default: the bundled SmolLM2
"""

import ctypes
import os
import signal
import subprocess
import sys

import llama_cpp
import numpy as np

CASES = [  # (label, type_k, environment)
    ("f16", "GGML_TYPE_F16", {}),
    ("q8_0", "GGML_TYPE_Q8_0", {}),
    ("q4_0", "GGML_TYPE_Q4_0", {}),
    ("q8_0, LLAMA_ATTN_ROT_DISABLE=1", "GGML_TYPE_Q8_0", {"LLAMA_ATTN_ROT_DISABLE": "1"}),
    ("q4_0, LLAMA_ATTN_ROT_DISABLE=1", "GGML_TYPE_Q4_0", {"LLAMA_ATTN_ROT_DISABLE": "1"}),
    ("bf16", "30", {}),  # GGML_TYPE_BF16 (llama-cpp-python 0.3.36 does not name it)
]
N, SHIFT = 600, 1000


def decode(ctx, batch, tokens, start, want_last):
    for off in range(0, len(tokens), 512):
        chunk = tokens[off : off + 512]
        batch.n_tokens = len(chunk)
        for i, tok in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = tok, start + off + i, 1, 0
            batch.logits[i] = want_last and off + i == len(tokens) - 1
        assert llama_cpp.llama_decode(ctx, batch) == 0


def one_case(path: str, type_k: int) -> None:
    """In the child: print KL(direct || shifted) for a K cache of ``type_k`` (V stays f16)."""
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(model)
    from selfextend_local.tasks.corpus import pydoc_text  # any long text will do; this one is pinned

    text = pydoc_text()[:20000].encode()
    buf = (llama_cpp.llama_token * 4096)()
    llama_cpp.llama_tokenize(vocab, text, len(text), buf, 4096, True, False)
    tokens = list(buf[: N + 1])
    logits = []
    for shifted in (True, False):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 2048, 512, 512
        params.type_k, params.type_v = type_k, llama_cpp.GGML_TYPE_F16
        ctx = llama_cpp.llama_init_from_model(model, params)
        batch = llama_cpp.llama_batch_init(512, 0, 1)
        decode(ctx, batch, tokens[:N], 0 if shifted else SHIFT, False)
        if shifted:
            llama_cpp.llama_memory_seq_add(llama_cpp.llama_get_memory(ctx), 0, 0, -1, SHIFT)
        decode(ctx, batch, tokens[N:], N + SHIFT, True)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).astype(np.float64)
        logits.append(row - row.max() - np.log(np.exp(row - row.max()).sum()))
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    direct, moved = logits[1], logits[0]
    kl = float((np.exp(direct) * (direct - moved)).sum())
    print(f"KL {kl:.4g}, same top token: {int(direct.argmax() == moved.argmax())}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        one_case(sys.argv[2], int(sys.argv[3]))
        return
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        from selfextend_local.paths import bundled_model

        path = str(bundled_model())
    print(f"llama-cpp-python {llama_cpp.__version__}, {os.path.basename(path)}: {N} tokens shifted by +{SHIFT}")
    for label, type_name, env in CASES:
        type_k = getattr(llama_cpp, type_name, None) if type_name.startswith("GGML") else int(type_name)
        done = subprocess.run(
            [sys.executable, __file__, "--case", path, str(type_k)],
            capture_output=True,
            text=True,
            env={**os.environ, "GGML_NO_BACKTRACE": "1", **env},  # ggml's backtrace on an abort can hang in gdb
            timeout=300,
        )
        if done.returncode < 0:
            said = f"CRASHED ({signal.Signals(-done.returncode).name})"
        elif done.returncode:
            said = f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
        else:
            said = done.stdout.strip()
        print(f"  {label:34s} {said}")


if __name__ == "__main__":
    main()
