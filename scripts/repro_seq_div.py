"""Minimal reproduction of the llama_memory_seq_div K-shift defect (docs/UPSTREAM_SEQ_DIV.md).

Decode 32 tokens at positions 0..31, divide their positions by 4, decode one more token at position 8,
and compare its logits with those after the same division done by llama_memory_seq_add (which records
its K-shift correctly). A correct seq_div gives identical logits (KL 0).

    python scripts/repro_seq_div.py [MODEL.gguf]     # default: the bundled SmolLM2
"""

import ctypes
import sys

import llama_cpp
import numpy as np


def run(model, tokens, divide):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch = 256, 64
    ctx = llama_cpp.llama_init_from_model(model, params)
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(64, 0, 1)
    for i, tok in enumerate(tokens[:32]):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = tok, i, 1, 0, 0
    batch.n_tokens = 32
    assert llama_cpp.llama_decode(ctx, batch) == 0
    divide(mem)  # positions 0..31 -> 0..7, four cells each
    batch.token[0], batch.pos[0], batch.logits[0], batch.n_tokens = tokens[32], 8, 1, 1
    assert llama_cpp.llama_decode(ctx, batch) == 0
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    out = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 0), shape=(n_vocab,)).astype(np.float64)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return out - out.max() - np.log(np.exp(out - out.max()).sum())  # log-probabilities


def by_seq_add(mem):
    for p in range(1, 32):  # lowest first, so a moved cell never lands on one still to move
        llama_cpp.llama_memory_seq_add(mem, 0, p, p + 1, p // 4 - p)


def by_seq_div(mem):
    llama_cpp.llama_memory_seq_div(mem, 0, 0, 32, 4)


def main() -> None:
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        from selfextend_local.paths import bundled_model

        path = str(bundled_model())
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept alive while llama.cpp runs
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(model)
    text = b"The committee met on a grey morning to read the letters again, one by one, while the rain fell. " * 3
    buf = (llama_cpp.llama_token * 256)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, 256, False, False)
    tokens = list(buf[:n])
    ref, div = run(model, tokens, by_seq_add), run(model, tokens, by_seq_div)
    kl = float((np.exp(ref) * (ref - div)).sum())
    print(f"llama-cpp-python {llama_cpp.__version__}: KL(seq_add || seq_div) = {kl:.4g}")
    print("seq_div is correct" if kl < 1e-3 else "seq_div is DEFECTIVE: the divided keys were rotated the wrong way")


if __name__ == "__main__":
    main()
