"""A plain numpy forward pass of llama-architecture GGUF models, with the paper's exact SelfExtend.

Weights are dequantized to float32 (``gguf.quants.dequantize``); the pass is RMSNorm, RoPE with the
model's base (llama.cpp's "normal" pair layout, which GGUF llama weights are converted for), grouped-query
attention, SwiGLU, tied or separate output. SelfExtend here is the paper's bi-level attention: for each
query-key pair, the neighbor score (relative position ``i - j``) when ``i - j < W``, else the grouped
score (relative position ``i//G - j//G + W - W//G``), merged before one softmax. It is slow (a few
hundred tokens) and exists as the yardstick for the llama.cpp schedules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..engine.errors import ModelError


@dataclass(frozen=True)
class Hyper:
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_base: float
    rope_dim: int
    eps: float


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


class ReferenceModel:
    """Dequantized weights of a llama-architecture GGUF, and the exact forward pass."""

    def __init__(self, path: str | Path) -> None:
        reader = gguf.GGUFReader(path)
        arch = _field(reader, "general.architecture")
        if arch != "llama":
            raise ModelError("the numpy reference supports the llama architecture, not {arch}", arch=arch)
        n_embd = int(_field(reader, "llama.embedding_length"))
        n_head = int(_field(reader, "llama.attention.head_count"))
        head_dim = n_embd // n_head
        self.hp = Hyper(
            n_layer=int(_field(reader, "llama.block_count")),
            n_head=n_head,
            n_head_kv=int(_field(reader, "llama.attention.head_count_kv", n_head)),
            head_dim=head_dim,
            rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
            rope_dim=int(_field(reader, "llama.rope.dimension_count", head_dim)),
            eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        )
        self.w = {t.name: self._dequantize(t) for t in reader.tensors}
        if "output.weight" not in self.w:
            self.w["output.weight"] = self.w["token_embd.weight"]  # tied embeddings

    @staticmethod
    def _dequantize(tensor) -> np.ndarray:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.ascontiguousarray(data, dtype=np.float32)

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.hp.eps) * weight

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate consecutive pairs (x[2i], x[2i+1]) by position * base^(-2i/d): llama.cpp's normal mode."""
        d = self.hp.rope_dim
        theta = self.hp.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        angle = positions[:, None].astype(np.float64) * theta[None, :]
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        out = x.copy()
        a, b = x[..., 0:d:2], x[..., 1:d:2]
        out[..., 0:d:2] = a * cos[:, None, :] - b * sin[:, None, :]
        out[..., 1:d:2] = a * sin[:, None, :] + b * cos[:, None, :]
        return out

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, group: int, window: int) -> np.ndarray:
        """q: (n, H, d), k and v: (n, Hkv, d) before RoPE. Causal; bi-level when group > 1."""
        n = q.shape[0]
        pos = np.arange(n)
        qn, kn = self._rope(q, pos), self._rope(k, pos)
        rep = self.hp.n_head // self.hp.n_head_kv
        kn, vv = np.repeat(kn, rep, axis=1), np.repeat(v, rep, axis=1)
        scale = 1.0 / np.sqrt(self.hp.head_dim)
        scores = np.einsum("ihd,jhd->hij", qn, kn) * scale
        if group > 1:
            # grouped attention: query at i//G + (W - W//G), key at j//G, so their difference is the paper's
            qg = self._rope(q, pos // group + window - window // group)
            kg = np.repeat(self._rope(k, pos // group), rep, axis=1)
            grouped = np.einsum("ihd,jhd->hij", qg, kg) * scale
            far = (pos[:, None] - pos[None, :]) >= window
            scores = np.where(far[None], grouped, scores)
        scores = np.where(np.tril(np.ones((n, n), dtype=bool))[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        return np.einsum("hij,jhd->ihd", probs, vv)

    def logits(self, tokens: list[int], group: int = 1, window: int = 0) -> np.ndarray:
        """Logits for every position, shape (n, n_vocab); ``group`` 1 is plain attention."""
        hp, w = self.hp, self.w
        x = w["token_embd.weight"][np.asarray(tokens)]
        n = len(tokens)
        for layer in range(hp.n_layer):
            p = f"blk.{layer}."
            h = self._rms(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(n, hp.n_head, hp.head_dim)
            k = (h @ w[p + "attn_k.weight"].T).reshape(n, hp.n_head_kv, hp.head_dim)
            v = (h @ w[p + "attn_v.weight"].T).reshape(n, hp.n_head_kv, hp.head_dim)
            att = self._attention(q, k, v, group, window).reshape(n, hp.n_head * hp.head_dim)
            x = x + att @ w[p + "attn_output.weight"].T
            h = self._rms(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            up = h @ w[p + "ffn_up.weight"].T
            x = x + ((gate / (1.0 + np.exp(-gate))) * up) @ w[p + "ffn_down.weight"].T
        return self._rms(x, w["output_norm.weight"]) @ w["output.weight"].T
