"""A float64 model of llama.cpp's K-shift graph on a Hadamard-rotated K (no quantization): does one shift give
the keys a direct decode at the shifted positions gives?

Models `build_rope_shift` of the vendored llama.cpp (stock: a view of the n_rot rotary dimensions, Hadamard
over rows of that view) against our patch 0002 (whole heads, rope at the rotary offset), for full rotary,
partial rotary and MLA layouts, and YaRN's magnitude factor (re-applied by the stock shift). Prints the
relative key error of each; the figures in docs/UPSTREAM_KSHIFT_QUANT.md come from it. No model needed.

    python scripts/kshift_graph_model.py
"""

import numpy as np

rng = np.random.default_rng(0)


def hadamard(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rope(x, pos, n_dims, offs=0, base=10000.0, mscale=1.0):  # GGML_ROPE_TYPE_NORMAL, x: [cells, heads, ne0]
    y = x.copy()
    i = np.arange(0, n_dims, 2)
    theta = pos[:, None] * base ** (-i / n_dims)  # [cells, n_dims/2]
    c, s = np.cos(theta)[:, None, :] * mscale, np.sin(theta)[:, None, :] * mscale
    a, b = x[..., offs + i], x[..., offs + i + 1]
    y[..., offs + i] = a * c - b * s
    y[..., offs + i + 1] = a * s + b * c
    return y


def rot_chunks(x, H):  # llama_mul_mat_hadamard: flatten (C order == ggml ne0-fastest), rows of nrot
    n = H.shape[0]
    return (x.reshape(-1, n) @ H.T).reshape(x.shape)


def case(name, head, n_rot, nope, nrot, cells=256, heads=4, d=1000):
    H = hadamard(nrot)
    k = rng.standard_normal((cells, heads, head))
    p = np.arange(cells, dtype=float)
    stored = rot_chunks(rope(k, p, n_rot, nope), H)
    fresh = rot_chunks(rope(k, p + d, n_rot, nope), H)
    # stock: view of n_rot dims at offset nope, cast -> H -> rope -> H -> cpy back into that view
    v = stored[..., nope : nope + n_rot].copy()
    v = rot_chunks(rope(rot_chunks(v, H), np.full(cells, d, float), n_rot), H)
    stock = stored.copy()
    stock[..., nope : nope + n_rot] = v
    # patched: whole heads, rope at offset nope
    patched = rot_chunks(rope(rot_chunks(stored, H), np.full(cells, d, float), n_rot, nope), H)

    def rel(a):
        return np.linalg.norm(a - fresh) / np.linalg.norm(fresh)

    print(
        f"{name:38s} head={head:3d} n_rot={n_rot:3d} nope={nope:3d} nrot={nrot:3d}: "
        f"rel.err stock={rel(stock):.2e} patched={rel(patched):.2e}"
    )


case("full rotary (SmolLM2-like)", 64, 64, 0, 64)
case("full rotary, head 128", 128, 128, 0, 128)
case("full rotary, head 192", 192, 192, 0, 64)
case("partial rotary 0.5 (GLM-like)", 128, 64, 0, 128)
case("partial rotary 0.75 (Phi-4-mini-like)", 128, 96, 0, 128)
case("partial rotary 0.25", 64, 16, 0, 64)
case("MLA absorbed (DeepSeek-V2-like)", 576, 64, 512, 64, heads=1)
case("MLA, hypothetical rope 32 (misaligned)", 576, 32, 544, 64, heads=1)

# YaRN magnitude: ggml scales by attn_factor * (1 + 0.1 ln(1/freq_scale)) when ext_factor != 0
# (ggml-cpu/ops.cpp:6193-6201); llama-context.cpp:203,211 set attn_factor = get_mscale(s) / (1 + 0.1 ln s),
# so the net scale is get_mscale(s) = 1 + 0.1 ln s.
k = rng.standard_normal((8, 1, 64))
p = np.arange(8.0)
s = 4.0
m = 1 + 0.1 * np.log(s)
fresh = rope(k, p + 1000, 64, mscale=m)
stock = rope(rope(k, p, 64, mscale=m), np.full(8, 1000.0), 64, mscale=m)
patched = rope(rope(k, p, 64, mscale=m), np.full(8, 1000.0), 64, mscale=1.0)
ratios = [np.linalg.norm(x) / np.linalg.norm(fresh) for x in (stock, patched)]
print(f"YaRN s=4: |stock|/|fresh| = {ratios[0]:.4f}, |patched|/|fresh| = {ratios[1]:.4f}")
