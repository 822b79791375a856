"""A multi-turn conversation over one session, with the model's own chat template."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..engine.errors import InputTooLongError, Interrupted
from ..engine.generate import stream_generate
from ..engine.model import Model
from ..engine.sampling import Chunk
from ..engine.session import Session, open_session
from ..engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from ..engine.slots import Progress


class Conversation:
    """Keeps the messages and a session; each turn ingests only what the cache does not hold yet.

    The session is sized for twice the conversation so far; when the history outgrows it, a larger
    session is planned (SelfExtend engages past the training context) and the history re-ingested.
    """

    def __init__(
        self,
        model: Model,
        extend: ExtendSettings,
        runtime: RuntimeSettings,
        sampling: SamplingSettings,
        system: str | None = None,
    ) -> None:
        self.model = model
        self.extend = extend
        self.runtime = runtime
        self.sampling = sampling
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.session: Session | None = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        if self.session:
            self.session.reset()

    def close(self) -> None:
        if self.session:
            self.session.close()
            self.session = None

    def _ensure_session(self, needed: int) -> Session:
        if self.session and needed <= self.session.n_ctx:
            return self.session
        self.close()
        try:
            self.session = open_session(self.model, max(2 * needed, 2048), self.extend, self.runtime)
        except InputTooLongError:
            self.session = open_session(self.model, needed, self.extend, self.runtime)
        return self.session

    def reply(
        self, text: str, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[Chunk]:
        """Stream the assistant's answer to ``text``; the (possibly partial) answer joins the history."""
        self.messages.append({"role": "user", "content": text})
        tokens = self.model.chat_tokens(self.messages)
        try:
            session = self._ensure_session(len(tokens) + self.sampling.max_tokens)
            parts: list[str] = []
            for chunk in stream_generate(session, tokens, self.sampling, progress, should_stop):
                parts.append(chunk.text)
                yield chunk
        except (Interrupted, InputTooLongError):
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": "".join(parts)})
