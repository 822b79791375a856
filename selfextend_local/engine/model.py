"""A loaded GGUF model: metadata, tokenizer, chat template, and whether SelfExtend can apply to it."""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import stat
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import gguf
import llama_cpp

from . import llama_log
from .build import patch_level
from .errors import BadInputError, ModelError, Name

_ROPE_NAMES = {
    llama_cpp.LLAMA_ROPE_TYPE_NONE: "none",
    llama_cpp.LLAMA_ROPE_TYPE_NORM: "normal",
    llama_cpp.LLAMA_ROPE_TYPE_NEOX: "neox",
    llama_cpp.LLAMA_ROPE_TYPE_MROPE: "m-rope",
    llama_cpp.LLAMA_ROPE_TYPE_IMROPE: "interleaved m-rope",
    llama_cpp.LLAMA_ROPE_TYPE_VISION: "vision m-rope",
}


@lru_cache(maxsize=1)
def _init_backend() -> None:
    # On an abort ggml attaches gdb to print a backtrace, which can hang for minutes where gdb is installed:
    # a process that must die should die at once.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    llama_log.install()
    llama_cpp.llama_backend_init()


def check_gguf_file(path: Path) -> None:
    """Raise ModelError unless ``path`` is a readable GGUF file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ModelError("model file not found: {path}", param="model", path=path) from None
    except OSError as exc:
        raise ModelError("cannot read {path}: {why}", param="model", path=path, why=exc.strerror or exc) from None
    if stat.S_ISDIR(mode):
        raise ModelError("{path} is a directory; pass a .gguf file", param="model", path=path)
    if not stat.S_ISREG(mode):
        raise ModelError(
            "{path} is not a regular file (a FIFO, socket or device); pass a .gguf file", param="model", path=path
        )
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError("cannot read {path}: {why}", param="model", path=path, why=exc.strerror or exc) from None
    if magic != b"GGUF":
        raise ModelError(
            "{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model", param="model", path=path
        )


@dataclass(frozen=True)
class ModelInfo:
    """What the tool needs to know about a model, read from its GGUF header."""

    path: Path
    name: str
    architecture: str
    n_ctx_train: int
    rope_type: str
    rope_freq_base: float | None
    rope_scaling: str
    sliding_window: int
    quantization: str
    n_params: int
    size_bytes: int
    n_layers: int
    chat_template: str | None
    n_embd_k: int = 0  # per layer and token: K width over all KV heads (for memory estimates)
    n_embd_v: int = 0
    head_k: int = 0  # K width of one head
    n_rot: int = 0  # how many of a head's dimensions RoPE rotates (the head's width unless partial)
    mla: bool = False  # multi-head latent attention (DeepSeek's compressed KV)
    rope_attn_factor: float = 1.0  # RoPE's magnitude factor (LongRoPE models set it)

    @property
    def extendable_reason(self) -> str | None:
        """Why SelfExtend cannot apply to this model, or None when it can."""
        if self.rope_type == "none":
            return f"{self.architecture} has no rotary position embedding (RoPE); SelfExtend remaps RoPE positions"
        if "m-rope" in self.rope_type:
            return f"{self.architecture} uses {self.rope_type}; llama.cpp refuses position edits on it"
        if self.rope_scaling == "yarn":
            return (
                "the model uses YaRN RoPE scaling; llama.cpp re-applies YaRN's magnitude scale on every K-shift, "
                "so grouped keys would be wrong"
            )
        if self.rope_attn_factor != 1.0 and patch_level(llama_cpp.__version__) < 2:
            return (
                f"the model scales RoPE by {self.rope_attn_factor:g} (rope.scaling.attn_factor), which this llama.cpp "
                "applies again on every K-shift; `selfextend-local build-llama` builds it with the fix"
            )
        if self.sliding_window:
            return (
                f"the model uses sliding-window attention ({self.sliding_window} tokens), which masks by position; "
                "grouped positions would change what those layers see"
            )
        return None


class Model:
    """A GGUF model loaded through llama.cpp's C API (``vocab_only`` for a cheap header read)."""

    def __init__(self, path: str | Path, gpu_layers: int = 0, vocab_only: bool = False) -> None:
        self.path = Path(path)
        self.vocab_only = vocab_only
        check_gguf_file(self.path)
        _init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.vocab_only = vocab_only
        llama_log.clear_errors()
        handle = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            detail = llama_log.last_error()
            raise ModelError(
                "llama.cpp could not load {path}"
                + (": {detail}" if detail else "; the file may be truncated or damaged (run with {log})"),
                path=self.path,
                detail=detail,
                log=Name("llama_log"),
            )
        self.handle = handle
        self.vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}

    def close(self) -> None:
        if self.handle:
            llama_cpp.llama_model_free(self.handle)
            self.handle = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None when the key is absent."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    @cached_property
    def info(self) -> ModelInfo:
        arch = self.meta("general.architecture") or "unknown"
        file_type = self.meta("general.file_type")
        try:
            quant = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type else "unknown"
        except ValueError:
            quant = f"type {file_type}"
        base = self.meta(f"{arch}.rope.freq_base")
        n_embd_k, n_embd_v, head_k = (0, 0, 0) if self.vocab_only else self._kv_widths(arch)
        return ModelInfo(
            path=self.path,
            name=self.meta("general.name") or self.path.stem,
            architecture=arch,
            n_ctx_train=int(self.meta(f"{arch}.context_length") or llama_cpp.llama_model_n_ctx_train(self.handle)),
            rope_type=_ROPE_NAMES.get(llama_cpp.llama_model_rope_type(self.handle), "unknown"),
            rope_freq_base=float(base) if base else None,
            rope_scaling=(self.meta(f"{arch}.rope.scaling.type") or "none").lower(),
            sliding_window=int(self.meta(f"{arch}.attention.sliding_window") or 0),
            quantization=quant,
            n_params=llama_cpp.llama_model_n_params(self.handle),
            size_bytes=self.path.stat().st_size,
            n_layers=int(self.meta(f"{arch}.block_count") or llama_cpp.llama_model_n_layer(self.handle)),
            chat_template=self.meta("tokenizer.chat_template"),
            n_embd_k=n_embd_k,
            n_embd_v=n_embd_v,
            head_k=head_k,
            n_rot=int(self.meta(f"{arch}.rope.dimension_count") or head_k),
            mla=self.meta(f"{arch}.attention.kv_lora_rank") is not None,
            rope_attn_factor=float(self.meta(f"{arch}.rope.scaling.attn_factor") or 1.0),
        )

    def _kv_widths(self, arch: str) -> tuple[int, int, int]:
        """K and V widths a layer caches per token (all KV heads), and one head's K width; needs the
        weights' hyperparameters."""
        n_head = max(llama_cpp.llama_model_n_head(self.handle), 1)
        n_head_kv = llama_cpp.llama_model_n_head_kv(self.handle) or n_head
        head = llama_cpp.llama_model_n_embd(self.handle) // n_head
        key_length = int(self.meta(f"{arch}.attention.key_length") or head)
        value_length = int(self.meta(f"{arch}.attention.value_length") or head)
        return n_head_kv * key_length, n_head_kv * value_length, key_length

    # -- tokens ---------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text to token ids; ``add_special`` adds BOS where the model wants one."""
        data = utf8(text)
        capacity = len(data) + 16
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (asked of llama.cpp once a token id, not on every generated
        token: each ctypes call gives up the GIL, to the server's event loop if it is waiting)."""
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return eog

    def special_text(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    # -- chat -----------------------------------------------------------------------------------

    @cached_property
    def _chat_formatter(self):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.info.chat_template
        if not template:
            raise ModelError(
                "{name} has no chat template in its GGUF metadata; use `generate` instead", name=self.path.name
            )
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        eos = llama_cpp.llama_vocab_eos(self.vocab)
        return Jinja2ChatFormatter(
            template=template,
            bos_token=self.special_text(bos) if bos >= 0 else "",
            eos_token=self.special_text(eos) if eos >= 0 else "",
        )

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """Render ``messages`` with the GGUF's own chat template, ready for the assistant's reply."""
        try:
            return self._chat_formatter(messages=messages).prompt
        except ModelError:
            raise
        except Exception as exc:  # jinja2 errors from a template we do not control
            raise ModelError("the model's chat template failed to render: {why}", why=exc) from exc

    def chat_segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered chat as ``(text, is_markup)`` pieces: the template's own markup, and each
        message's content, which is the user's text and must never become a control token."""
        for i, message in enumerate(messages):
            check_role(message["role"], i)
        nonce = secrets.token_hex(8)  # the marks cannot be forged by a message's content
        marks = [f"\ue000{nonce}{i}\ue001" for i in range(len(messages))]
        rendered = self.chat_text([{**m, "content": mark} for m, mark in zip(messages, marks)])
        pattern = re.compile(f"\ue000{nonce}(\\d+)\ue001")
        pieces: list[tuple[str, bool]] = []
        at = 0
        for found in pattern.finditer(rendered):
            pieces.append((rendered[at : found.start()], True))
            pieces.append((messages[int(found.group(1))]["content"], False))
            at = found.end()
        pieces.append((rendered[at:], True))
        return [(text, markup) for text, markup in pieces if text]

    def segments_tokens(self, pieces: list[tuple[str, bool]], bos: bool = True) -> list[int]:
        """Tokens of ``(text, is_markup)`` pieces: special tokens parsed in markup only, one BOS at most."""
        tokens: list[int] = []
        for text, markup in pieces:
            tokens += self.tokenize(text, add_special=bos and not tokens, parse_special=markup)
        first = llama_cpp.llama_vocab_bos(self.vocab)
        if len(tokens) > 1 and tokens[0] == first and tokens[1] == first:
            tokens = tokens[1:]  # the template wrote its own BOS
        return tokens

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation rendered with the chat template and tokenized, user text kept as text."""
        return self.segments_tokens(self.chat_segments(messages))


ROLE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,31}")


def check_role(role: object, index: int) -> None:
    """A message's role is a plain name: the template writes it as markup, where control-token syntax in it
    would be parsed."""
    if not isinstance(role, str) or not ROLE.fullmatch(role):
        raise BadInputError(
            "messages[{index}].role must be a name such as user, assistant or system, got {role!r}",
            param="input",
            index=index,
            role=role if not isinstance(role, str) else role[:40],
        )


def utf8(text: str) -> bytes:
    """``text`` as UTF-8; a lone surrogate (which JSON's \\ud800 escapes can make) is an input error."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInputError(
            "the text is not valid Unicode: a lone surrogate ({char!r}) at character {at}; send whole characters",
            param="input",
            char=exc.object[exc.start],
            at=exc.start,
        ) from None
