"""Rendering for the terminal: progress bars and logs on stderr, answers on stdout, Ctrl-C as a flag."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import click

from ..engine.eta import Clock
from ..engine.paces import Pace


def log(message: str) -> None:
    click.echo(message, err=True)


HISTORY_LINES = 1000


def history_file(name: str):
    from pathlib import Path

    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "selfextend-local" / f"{name}_history"


@contextmanager
def line_editing(name: str) -> Iterator[None]:
    """Line editing and a history kept across runs for interactive prompts (readline, where there is one)."""
    try:
        if not sys.stdin.isatty():
            raise ImportError
        import readline
    except ImportError:
        yield
        return
    path = history_file(name)
    try:
        readline.read_history_file(path)
    except (OSError, ValueError):
        pass
    readline.set_history_length(HISTORY_LINES)
    try:
        yield
    finally:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass


def read_line(prompt: str) -> str:
    """A line typed by the user. The prompt goes where the user looks: the terminal, never into a
    redirected stdout."""
    if sys.stdout.isatty():
        return input(prompt)
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def is_verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get("selfextend.verbose"))


def note(message: str) -> None:
    """A detail shown only with --verbose."""
    if is_verbose():
        log(message)


PROGRESS_SECONDS_ENV = "SELFEXTEND_LOCAL_PROGRESS_SECONDS"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


DEFAULT_PROGRESS_SECONDS = 10.0


def progress_seconds() -> float:
    """Seconds between progress lines off a terminal: $SELFEXTEND_LOCAL_PROGRESS_SECONDS, or 10 (with a
    warning when the variable is not a number of seconds)."""
    text = os.environ.get(PROGRESS_SECONDS_ENV)
    if text is None:
        return DEFAULT_PROGRESS_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 <= value < float("inf")):  # 0: a line at every step
        _warn_once(f"warning: {PROGRESS_SECONDS_ENV}={text!r} is not a number of seconds (0 or more); using 10")
        return DEFAULT_PROGRESS_SECONDS
    return value


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log(message)


class IngestProgress:
    """A ``(done, total)`` callback for long work, on stderr.

    On a terminal: a bar with the rate and the time left. Otherwise (a log file, a pipe, CI): one line when
    work starts, then one every ``every`` seconds ($SELFEXTEND_LOCAL_PROGRESS_SECONDS, default 10) and one
    at the end, each with done/total, the rate and the time left. With ``costly`` (a prompt read: each
    token costs more than the one before it) the time left comes from the reading's cost model
    (:class:`~..engine.eta.Clock`), else from the rate so far (files of a batch cost alike). With a ``pace``
    (:mod:`..engine.paces`) the cost model starts from what earlier readings of the setup said, and a
    reading that ends here leaves its own.
    """

    def __init__(
        self,
        label: str = "ingesting",
        unit: str = "tokens",
        rate_unit: str = "tok/s",
        per_minute: bool = False,
        costly: bool = True,
        pace: Pace | None = None,
    ) -> None:
        self.label = label
        self.unit = unit
        self.rate_unit = rate_unit
        self.scale = 60.0 if per_minute else 1.0
        self.bar = None
        self.start: float | None = None
        self.first = 0
        self.done = 0
        self.printed = float("-inf")
        self.every = progress_seconds()
        self.pace = pace if costly else None
        self.clock = (pace.clock() if pace is not None else Clock()) if costly else None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start, self.first = now, done
        if self.clock is not None:
            self.clock.mark(done, now)
        if sys.stderr.isatty():
            self._draw(done, total)
        elif done >= total or now - self.printed >= self.every:
            log(self.line(done, total, now))
            self.printed = now
        self.done = done
        if done >= total:
            if self.pace is not None and self.clock is not None:
                self.pace.record(self.clock, total)
                self.pace = None  # once
            self.close()

    def rate(self, done: int, now: float) -> float:
        seconds = now - (self.start or now)
        return (done - self.first) / seconds if seconds > 0 else 0.0

    def line(self, done: int, total: int, now: float) -> str:
        rate = self.rate(done, now)
        text = f"{self.label}: {done:,}/{total:,} {self.unit} ({100 * done / max(total, 1):.0f}%)"
        if rate > 0:
            text += f", {rate * self.scale:,.1f} {self.rate_unit}"
            if done < total and (left := self.seconds_left(done, total, rate)) is not None:
                text += f", about {_duration(left)} left"
        if done >= total and self.start is not None:
            text += f", done in {_duration(now - self.start)}"
        return text

    def seconds_left(self, done: int, total: int, rate: float) -> float | None:
        if self.clock is None:
            return (total - done) / rate
        return self.clock.seconds_left(done, total)

    def _draw(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(
                length=total, label=self.label, file=sys.stderr, show_pos=True, item_show_func=self._rate
            )
            self.bar.__enter__()
        self.bar.update(done - self.done, done)

    def _rate(self, done: int | None) -> str:
        rate = self.rate(done or 0, time.perf_counter())
        if rate <= 0:
            return ""
        text = f"{rate * self.scale:,.1f} {self.rate_unit}"
        total = self.bar.length if self.bar is not None else 0
        if done is not None and done < total and (left := self.seconds_left(done, total, rate)) is not None:
            text += f", {_duration(left)} left"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class StopFlag:
    """Set by Ctrl-C while a reply streams; the engine polls it between tokens and chunks."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self) -> bool:
        return self.raised


@contextmanager
def ctrl_c_stops() -> Iterator[StopFlag]:
    """Within the block the first Ctrl-C only sets the flag; a second one interrupts as usual."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.raised:
            raise KeyboardInterrupt
        flag.raised = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def token_share(done: int, total: int) -> str:
    return f"{done:,} of {total:,} tokens ({done / max(total, 1):.0%})"


def say_resuming(done: int, total: int) -> None:
    """A reading resumes from its checkpoint: say where (the ``on_restore`` of :class:`Checkpoints`)."""
    log(f"resuming at {token_share(done, total)}")


def stopped_reading(done: int, total: int, kept: int) -> str:
    """The one line for a reading stopped by Ctrl-C: how far it got, and whether the same command resumes."""
    again = f"; the same command resumes at {token_share(kept, total)}" if kept else ""
    return f"stopped after {token_share(max(done, kept), total)}{again}"


def stats_line(chunk, plan_text: str) -> str:
    new = chunk.prompt_tokens - chunk.reused_tokens
    reused = f" ({chunk.reused_tokens} more reused from the cache)" if chunk.reused_tokens else ""
    return (
        f"prompt {new} new tokens{reused} in {chunk.prompt_seconds:.2f} s ({chunk.prompt_tps:,.0f} tok/s); "
        f"{chunk.generated_tokens} tokens in {chunk.generate_seconds:.2f} s ({chunk.generate_tps:,.1f} tok/s); "
        f"finish: {chunk.finish_reason}; {plan_text}"
    )


def render_stream(
    make_chunks: Callable[[IngestProgress, StopFlag], Iterable], label: str = "ingesting", pace: Pace | None = None
):
    """Stream the chunks' text to stdout, with the ingestion bar on stderr and Ctrl-C stopping the reply.

    Returns the last chunk (its counts, timings and finish reason), or None.
    """
    progress = IngestProgress(label, pace=pace)
    last = None
    with ctrl_c_stops() as stop:
        try:
            for last in make_chunks(progress, stop):
                click.echo(last.text, nl=False)
                sys.stdout.flush()
        finally:
            progress.close()
    click.echo()
    return last
