"""``Llama``: llama-cpp-python's high-level API, with SelfExtend planned for every prompt.

Code written for ``llama_cpp.Llama`` runs with only the import changed: the same constructor arguments
(those we support), ``create_completion`` / ``__call__``, ``create_chat_completion`` (with the GGUF's
chat template and ``response_format`` for JSON output), ``tokenize``, ``detokenize``, ``n_ctx`` and
``from_pretrained``, returning the same dicts. A prompt longer than the training context is
self-extended, as on the command line; ``batch`` runs many prompts together in one context. An argument we
do not support raises an error that names it, unless its value is the one that changes nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

# llama-cpp-python's own class, exported as ours too: code written for it passes it unchanged
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from .engine import scheduler
from .engine.checkpoint import Checkpointing
from .engine.errors import PYTHON, BadInputError, SelfExtendError
from .engine.grammar import Structure, response_format_structure
from .engine.kvcache import KVCache
from .engine.planning import Plan, plan_for
from .engine.sampling import Chunk, check_grammar
from .engine.scheduler import Scheduler
from .engine.session import Session, run
from .engine.settings import DRAFT, ExtendSettings, RuntimeSettings, SamplingSettings
from .engine.slots import Request
from .serving.openai import Reply

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama-cpp-python's "no seed": a fresh one each call
DEFAULT_ROOM = 512  # tokens to generate with max_tokens None when the context says nothing better

# llama-cpp-python's arguments we do not support, with the value that changes nothing (accepted silently)
_NEUTRAL_INIT = {
    "split_mode": 1,
    "main_gpu": 0,
    "tensor_split": None,
    "vocab_only": False,
    "use_mmap": True,
    "use_mlock": False,
    "kv_overrides": None,
    "n_ubatch": 512,
    "n_threads_batch": None,
    "rope_scaling_type": -1,
    "pooling_type": -1,
    "attention_type": -1,
    "rope_freq_base": 0.0,
    "rope_freq_scale": 0.0,
    "yarn_ext_factor": -1.0,
    "yarn_attn_factor": 1.0,
    "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0,
    "yarn_orig_ctx": 0,
    "logits_all": False,
    "embedding": False,
    "offload_kqv": True,
    "flash_attn": False,
    "op_offload": None,
    "swa_full": None,
    "no_perf": False,
    "last_n_tokens_size": 64,
    "lora_base": None,
    "lora_scale": 1.0,
    "lora_path": None,
    "numa": False,
    "chat_format": None,
    "chat_handler": None,
    "tokenizer": None,
    "type_k": None,
    "type_v": None,
    "spm_infill": False,
}
_NEUTRAL_CALL = {
    "suffix": None,
    "typical_p": 1.0,
    "logprobs": None,
    "top_logprobs": None,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repeat_penalty": 1.0,
    "tfs_z": 1.0,
    "mirostat_mode": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
    "model": None,
    "stopping_criteria": None,
    "logits_processor": None,
    "logit_bias": None,
    "functions": None,
    "function_call": None,
    "tools": None,
    "tool_choice": None,
}


def _refuse_unsupported(given: dict, neutral: dict, where: str) -> None:
    """Raise, naming every argument that is unknown or that we cannot honour with the value given."""
    unknown = sorted(k for k in given if k not in neutral)
    if unknown:
        raise TypeError(f"{where} got unexpected keyword arguments: {', '.join(unknown)}")
    unsupported = sorted(k for k, v in given.items() if v != neutral[k])
    if unsupported:
        shown = ", ".join(f"{k}={given[k]!r}" for k in unsupported)
        raise BadInputError(
            "selfextend_local.Llama does not support {shown} in {where}; leave them out",
            param=unsupported[0],
            shown=shown,
            where=where,
        )


@contextmanager
def _python_names() -> Iterator[None]:
    """Errors name settings as this API's arguments (``group=8``, ``n_ctx``), not as command-line flags."""
    try:
        yield
    except SelfExtendError as exc:
        exc.naming = PYTHON
        raise


def _draft_tokens(draft_model) -> int:
    """Tokens to draft a step (:mod:`.engine.drafting`) for llama-cpp-python's ``draft_model``: a
    LlamaPromptLookupDecoding's ``num_pred_tokens`` (its n-gram sizes are the engine's), the default for
    None; a draft model of another kind is refused by name."""
    if draft_model is None:
        return DRAFT
    if not isinstance(draft_model, LlamaPromptLookupDecoding):
        raise BadInputError(
            "selfextend_local.Llama drafts from the prompt itself and runs no draft model: "
            "draft_model={kind} is not supported; pass LlamaPromptLookupDecoding(num_pred_tokens=10) "
            "(from llama_cpp.llama_speculative or selfextend_local) or leave it out",
            param="draft_model",
            kind=type(draft_model).__name__,
        )
    return SamplingSettings(draft=draft_model.num_pred_tokens).draft


def _stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)


def _structure(grammar, response_format) -> Structure | None:
    """What the reply must be: ``response_format``'s JSON, or ``grammar`` (GBNF text or llama-cpp-python's
    LlamaGrammar), or nothing."""
    if response_format is not None:
        if grammar is not None:
            raise BadInputError("give response_format or grammar, not both", param="grammar")
        return response_format_structure(response_format)
    if grammar is None:
        return None
    text = grammar if isinstance(grammar, str) else getattr(grammar, "_grammar", None)
    if not isinstance(text, str):
        raise BadInputError("grammar must be GBNF text or a llama_cpp.LlamaGrammar", param="grammar")
    return Structure(text)


class ArgumentError(BadInputError, TypeError):
    """An argument of the wrong type, named."""


_NUMBER = (int, float)
# The types each argument takes; None among them means it may be None.
_TYPES = {
    "model_path": ((str, os.PathLike, type(None)), "a path or a model name"),
    "n_ctx": ((int, type(None)), "a whole number of KV cells, or None"),
    "n_threads": ((int, type(None)), "a whole number, or None"),
    "n_gpu_layers": ((int,), "a whole number"),
    "n_batch": ((int,), "a whole number"),
    "seed": ((int, type(None)), "a whole number"),
    "verbose": ((bool,), "True or False"),
    "group": ((int, type(None)), "a whole number, or None"),
    "window": ((int, type(None)), "a whole number, or None"),
    "schedule": ((str,), "a schedule's name"),
    "division": ((str,), "a division's name"),
    "kv_type": ((str,), "a KV cache type's name"),
    "checkpoints": ((bool,), "True or False"),
    "prompt": ((str, list), "text or a list of tokens"),
    "messages": ((list,), "a list of {role, content} dicts"),
    "max_tokens": ((int, type(None)), "a whole number, or None"),
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
    "min_p": (_NUMBER, "a number"),
    "top_k": ((int,), "a whole number"),
    "echo": ((bool,), "True or False"),
    "stream": ((bool,), "True or False"),
    "stop": ((str, list, tuple, type(None)), "a string, a list of strings, or None"),
    "response_format": ((dict, type(None)), "a dict such as {'type': 'json_object'}, or None"),
    "parallel": ((int,), "a whole number"),
}


def _check_types(values: dict) -> None:
    """Raise ArgumentError naming the first argument whose value is not of its type (bool is not a number)."""
    for name, value in values.items():
        if name not in _TYPES:
            continue
        types, what = _TYPES[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ArgumentError(
                "{name} must be {what}, got {value!r}", param=name, name=name, what=what, value=_short(value)
            )
    stop = values.get("stop")
    if isinstance(stop, (list, tuple)) and not all(isinstance(s, str) for s in stop):
        raise ArgumentError("stop must be a string or a list of strings, got {value!r}", param="stop", value=stop)
    prompt = values.get("prompt")
    if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ArgumentError("prompt must be text or a list of token ids (whole numbers)", param="prompt")


def _short(value: object) -> object:
    text = repr(value)
    return value if len(text) <= 60 else text[:57] + "..."


class _OneCallAtATime:
    """One call at a time on a Llama: another thread waits its turn; the same thread calling again while
    its own stream is open is refused by name (the two would share one context)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        me = threading.get_ident()
        if self.owner == me:
            raise BadInputError(
                "this Llama is still streaming an earlier reply on this thread; read that stream to its end "
                "(or close it) before the next call",
                param="stream",
            )
        with self.lock:
            self.owner = me
            try:
                yield
            finally:
                self.owner = None


@dataclass(frozen=True)
class _Call:
    """One prompt ready to run: its tokens and sampling, and how its reply is shaped."""

    tokens: list[int]
    sampling: SamplingSettings
    reply: Reply
    echo: str = ""


class Llama:
    """A GGUF model with SelfExtend, behind llama-cpp-python's high-level API.

    ``model_path`` defaults to the bundled SmolLM2-135M (a path, a registry name or ``REPO:QUANT`` also
    work). ``n_ctx`` is the KV cells to allocate; None or 0 plans them for each prompt. ``group``,
    ``window``, ``schedule`` and ``division`` are SelfExtend's (None: planned for each prompt's length).
    ``verbose`` shows llama.cpp's own log. ``draft_model``: ``LlamaPromptLookupDecoding(num_pred_tokens=K)``
    drafts up to K tokens a step from the prompt and the reply (where they pay), checked in the same decode:
    the reply is unchanged, and comes faster where it quotes. ``checkpoints``: a long prompt's reading is
    checkpointed in the
    disk cache as it goes (``$SELFEXTEND_LOCAL_CACHE``, else ~/.cache/selfextend-local/kv; bounded, least
    recently used first), and the same prompt given again after the process died resumes it.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = RuntimeSettings.gpu_layers,
        n_batch: int = RuntimeSettings.batch,
        seed: int = LLAMA_DEFAULT_SEED,
        verbose: bool = False,
        group: int | None = ExtendSettings.group,
        window: int | None = ExtendSettings.window,
        schedule: str = ExtendSettings.schedule,
        division: str = ExtendSettings.division,
        kv_type: str = RuntimeSettings.kv_type,
        checkpoints: bool = True,
        draft_model=None,
        **kwargs,
    ) -> None:
        from .engine import llama_log
        from .locate import load_model

        _refuse_unsupported(kwargs, _NEUTRAL_INIT, "Llama()")
        _check_types(
            {
                "model_path": model_path,
                "n_ctx": n_ctx,
                "n_threads": n_threads,
                "n_gpu_layers": n_gpu_layers,
                "n_batch": n_batch,
                "seed": seed,
                "verbose": verbose,
                "group": group,
                "window": window,
                "schedule": schedule,
                "division": division,
                "kv_type": kv_type,
                "checkpoints": checkpoints,
            }
        )
        with _python_names():
            threads = {"threads": n_threads} if n_threads else {}
            self.runtime = RuntimeSettings(
                n_ctx or None, gpu_layers=n_gpu_layers, batch=n_batch, kv_type=kv_type, **threads
            )
            self.extend = ExtendSettings(group, window, schedule, division)
            self.draft = _draft_tokens(draft_model)
            llama_log.set_echo(verbose)
            self.model = load_model(model_path, self.runtime)
        self.model_path = str(self.model.path)
        self.verbose = verbose
        self.seed = None if seed in (LLAMA_DEFAULT_SEED, -1) else seed
        self._session: Session | None = None
        self._turn = _OneCallAtATime()
        self._checkpointing = Checkpointing(KVCache() if checkpoints else None)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None = None, **kwargs) -> Llama:
        """Download ``filename`` (a name or a glob such as ``*Q4_K_M.gguf``) from ``repo_id`` on the
        Hugging Face hub, once, into the models folder, and load it."""
        from .hub import download

        for ignored in ("additional_files", "local_dir", "local_dir_use_symlinks", "cache_dir"):
            if kwargs.pop(ignored, None) is not None:
                raise BadInputError(
                    "selfextend_local.Llama.from_pretrained does not support {name}", param=ignored, name=ignored
                )
        with _python_names():
            path = download(repo_id, file=filename)
        return cls(path, **kwargs)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- tokens ---------------------------------------------------------------------------------

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.model.tokenize(text.decode("utf-8", errors="replace"), add_bos, special)

    def detokenize(
        self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None, special: bool = False
    ) -> bytes:
        pieces = (self.model.special_text(t).encode() if special else self.model.piece(t) for t in tokens)
        return b"".join(pieces)

    def n_ctx(self) -> int:
        """Cells a prompt and its reply may take: ``n_ctx`` if given, else what the model's SelfExtend
        setting reaches."""
        from .engine.capacity import default_cells

        return self.runtime.ctx or default_cells(self.model, self.extend)

    # -- completions ----------------------------------------------------------------------------

    def __call__(self, prompt: str | list[int], **kwargs):
        return self.create_completion(prompt, **kwargs)

    def create_completion(
        self,
        prompt: str | list[int],
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        echo: bool = False,
        stop: str | list[str] | None = None,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        grammar=None,
        **kwargs,
    ):
        """Text after ``prompt`` (a string, whose special tokens are parsed as llama-cpp-python does, or
        tokens): a ``text_completion`` dict, or an iterator of them with ``stream``."""
        _refuse_unsupported(kwargs, _NEUTRAL_CALL, "create_completion()")
        _check_types(
            {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "min_p": min_p,
                "echo": echo,
                "stop": stop,
                "top_k": top_k,
                "stream": stream,
                "seed": seed,
            }
        )
        with _python_names():
            tokens = self.model.tokenize(prompt, parse_special=True) if isinstance(prompt, str) else list(prompt)
            if not tokens:
                raise BadInputError("the prompt is empty; give some text", param="input")
            structure = _structure(grammar, None)
            sampling = self._sampling(len(tokens), max_tokens, temperature, top_p, min_p, top_k, stop, seed, structure)
            echoed = (prompt if isinstance(prompt, str) else self.model.detokenize(tokens)) if echo else ""
            call = _Call(tokens, sampling, Reply.new(self.model_path, chat=False), echoed)
        return self._stream(call) if stream else self._whole(call)

    def create_chat_completion(
        self,
        messages: list[dict],
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        response_format: dict | None = None,
        max_tokens: int | None = None,
        grammar=None,
        **kwargs,
    ):
        """The assistant's reply to ``messages`` through the GGUF's chat template: a ``chat.completion``
        dict, or ``chat.completion.chunk`` dicts with ``stream``. ``response_format`` ``json_object`` or
        ``json_schema`` constrains the reply to JSON (that validates against the schema)."""
        kwargs.pop("model", None)  # a name to report, as llama-cpp-python takes it: there is one model here
        _refuse_unsupported(kwargs, _NEUTRAL_CALL, "create_chat_completion()")
        _check_types(
            {
                "messages": messages,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "min_p": min_p,
                "stream": stream,
                "stop": stop,
                "seed": seed,
                "response_format": response_format,
                "max_tokens": max_tokens,
            }
        )
        with _python_names():
            tokens = self._chat_tokens(messages)
            structure = _structure(grammar, response_format)
            sampling = self._sampling(len(tokens), max_tokens, temperature, top_p, min_p, top_k, stop, seed, structure)
            call = _Call(tokens, sampling, Reply.new(self.model_path, chat=True))
        return self._stream(call) if stream else self._whole(call)

    def create_chat_completion_openai_v1(self, *args, **kwargs):
        """:meth:`create_chat_completion` returning the ``openai`` package's objects (``ChatCompletion``, or
        ``ChatCompletionChunk`` s when streaming), as llama-cpp-python's does: what ``instructor`` drives."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            raise BadInputError(
                "create_chat_completion_openai_v1 needs the openai package: pip install openai"
            ) from None
        if kwargs.get("stream", False):
            return (ChatCompletionChunk(**chunk) for chunk in self.create_chat_completion(*args, **kwargs))
        return ChatCompletion(**self.create_chat_completion(*args, **kwargs))

    def _chat_tokens(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise BadInputError("messages must be a non-empty list of {role, content} dicts", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ArgumentError("messages[{i}] must be a dict with a role and a content", param="messages", i=i)
        plain = [{"role": m["role"], "content": _content(m)} for m in messages]
        if self.model.info.chat_template:
            return self.model.chat_tokens(plain)
        return self.model.tokenize("\n".join(m["content"] for m in plain))

    def _sampling(self, n_prompt, max_tokens, temperature, top_p, min_p, top_k, stop, seed, structure):
        if structure is not None:
            check_grammar(self.model.vocab, structure.grammar)
        return SamplingSettings(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=self.seed if seed is None else seed,
            max_tokens=self._room(n_prompt) if not max_tokens or max_tokens <= 0 else max_tokens,
            stop=_stops(stop),
            draft=self.draft,
            **(structure.fields() if structure else {}),
        )

    def _room(self, n_prompt: int) -> int:
        """max_tokens None: what is left of n_ctx, or of the training context, or a fixed amount."""
        limit = self.runtime.ctx or self.model.info.n_ctx_train
        return limit - n_prompt if limit > n_prompt else DEFAULT_ROOM

    # -- running --------------------------------------------------------------------------------

    def _session_for(self, call: _Call) -> Session:
        """A session planned for the call: the current one when its plan and cells serve (prefix reuse
        across calls), else a new one."""
        n_new = call.sampling.max_tokens
        plan = plan_for(self.model, len(call.tokens) + n_new, self.extend, self.runtime, generate=n_new)
        current = self._session
        if current is not None and _same(current.plan, plan) and plan.n_ctx <= current.n_ctx:
            return current
        self.close()
        self._session = Session(self.model, plan, self.runtime)
        return self._session

    def _chunks(self, call: _Call) -> Iterator[Chunk]:
        with self._turn.held(), _python_names():
            session = self._session_for(call)
            request = Request(call.tokens, call.sampling, checkpoints=self._checkpointing(call.tokens))
            yield from run(session, request)

    def _whole(self, call: _Call) -> dict:
        parts, last = [call.echo], None
        for last in self._chunks(call):
            parts.append(last.text)
        whole = call.reply.whole("".join(parts), last, len(call.tokens))
        if not self.draft:  # llama-cpp-python's shape; with drafts, llama.cpp's timings say how many were kept
            del whole["timings"]
        return whole

    def _stream(self, call: _Call) -> Iterator[dict]:
        """Chunks as llama-cpp-python streams them: for a chat the role first, then the content, then an
        empty delta with the finish reason; for a completion the text (after the echo), the last with it."""
        reply = call.reply
        if reply.chat:
            yield reply.delta({"role": "assistant"})
        elif call.echo:
            yield reply.piece(call.echo)
        for chunk in self._chunks(call):
            if chunk.text:
                yield reply.delta({"content": chunk.text}) if reply.chat else reply.piece(chunk.text)
            if chunk.finish_reason is not None:
                finish = "length" if chunk.finish_reason == "length" else "stop"
                yield reply.delta({}, finish) if reply.chat else reply.piece("", finish=finish)

    # -- many prompts ---------------------------------------------------------------------------

    def batch(
        self,
        prompts: Sequence[str | list[dict]],
        parallel: int = 4,
        progress: Callable[[int, int], None] | None = None,
        **kwargs,
    ) -> list[dict]:
        """Answer every prompt (a string: a completion; a list of messages: a chat completion), up to
        ``parallel`` decoded together in one context, each with its own SelfExtend plan. Returns the
        responses in the order of ``prompts``; ``progress(done, total)`` after each one finishes.
        ``kwargs`` are those of ``create_completion`` / ``create_chat_completion`` (without ``stream``)."""
        _check_types({"parallel": parallel})
        with self._turn.held(), _python_names():
            calls = [self._prepare(p, kwargs) for p in prompts]
            return _run_batch(self.model, self.runtime, self.extend, calls, parallel, progress)

    def _prepare(self, prompt, kwargs: dict) -> _Call:
        options = dict(kwargs)
        if options.pop("stream", False):
            raise BadInputError("batch() does not stream; leave stream out", param="stream")
        chat = not isinstance(prompt, str)
        defaults = {"temperature": 0.2 if chat else 0.8, "top_p": 0.95, "min_p": 0.05, "top_k": 40}
        options = {**defaults, **options}
        _check_types(options)
        structure = _structure(options.pop("grammar", None), options.pop("response_format", None))
        echo = options.pop("echo", False)
        max_tokens = options.pop("max_tokens", None if chat else 16)
        stop, seed = options.pop("stop", None), options.pop("seed", None)
        picks = {k: options.pop(k) for k in ("temperature", "top_p", "min_p", "top_k")}
        _refuse_unsupported(options, _NEUTRAL_CALL, "batch()")
        tokens = self._chat_tokens(prompt) if chat else self.model.tokenize(prompt, parse_special=True)
        sampling = self._sampling(
            len(tokens),
            max_tokens,
            picks["temperature"],
            picks["top_p"],
            picks["min_p"],
            picks["top_k"],
            stop,
            seed,
            structure,
        )
        return _Call(tokens, sampling, Reply.new(self.model_path, chat), prompt if echo and not chat else "")


def _same(a: Plan, b: Plan) -> bool:
    return (a.group, a.window, a.schedule, a.division) == (b.group, b.window, b.schedule, b.division)


def _content(message: dict) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text", ""), str) for p in content
    ):
        return "".join(p.get("text", "") for p in content)
    raise BadInputError("message content must be text (a string or text parts)", param="messages")


def _run_batch(model, runtime, extend, calls: list[_Call], parallel: int, progress) -> list[dict]:
    """Every call in one context of up to ``parallel`` slots; responses in the order of ``calls``."""
    if not calls:
        return []
    longest = max(len(c.tokens) + c.sampling.max_tokens for c in calls)
    chosen = scheduler.size(model, runtime, extend, slots=min(parallel, len(calls)), longest=longest)
    batch = _Batch(calls, progress)
    with Scheduler.create(model, runtime, capacity=chosen) as serving:
        for i, call in enumerate(calls):  # each planned as it is submitted: one that cannot fit fails first
            serving.submit(
                Request(call.tokens, call.sampling, extend, on_chunk=batch.chunk_for(i), on_error=batch.fail)
            )
        for _ in serving.steps():
            if batch.error is not None:
                raise batch.error
    return batch.results


class _Batch:
    """Where the replies of a batch go: each call's text, then its response in its place."""

    def __init__(self, calls: list[_Call], progress) -> None:
        self.calls, self.progress = calls, progress
        self.results: list[dict | None] = [None] * len(calls)
        self.parts: list[list[str]] = [[c.echo] for c in calls]
        self.done = 0
        self.error: Exception | None = None

    def chunk_for(self, index: int) -> Callable[[Chunk], None]:
        def on_chunk(chunk: Chunk) -> None:
            self.parts[index].append(chunk.text)
            if chunk.finish_reason is not None:
                call = self.calls[index]
                self.results[index] = call.reply.whole("".join(self.parts[index]), chunk, len(call.tokens))
                self.done += 1
                if self.progress:
                    self.progress(self.done, len(self.calls))

        return on_chunk

    def fail(self, exc: Exception) -> None:
        self.error = self.error or exc
