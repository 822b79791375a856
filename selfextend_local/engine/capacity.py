"""How many sequences at once, of how many cells each: chosen from the model, the settings and the memory.

The server (and ``summarize --parallel``) allocates one context up front: ``slots`` sequences of ``cells``
KV cells each. By default a slot holds what the model family's SelfExtend setting reaches (the longest
request worth accepting), and there are as many slots as half the available memory holds, at most
:data:`DEFAULT_SLOTS`; either is lowered to fit when memory is short, and either can be given.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInputError, Name
from .memory import available_memory, gib, kv_bytes_per_cell
from .planning import CTX_ALIGN, default_setting, max_input
from .settings import ExtendSettings, RuntimeSettings

DEFAULT_SLOTS = 4  # measured on 2 CPU cores: 4 sequences decode ~3x the tokens/s of one (README)
MAX_SLOTS = 64
MEMORY_SHARE = 0.5  # of the available memory the KV cache of all slots may take


@dataclass(frozen=True)
class Capacity:
    slots: int
    cells: int
    kv_bytes: int
    reason: str

    def describe(self) -> str:
        return (
            f"{self.slots} slot{'s' if self.slots > 1 else ''} of {self.cells:,} cells "
            f"({gib(self.kv_bytes)} KV cache): requests up to {self.cells:,} tokens, prompt and max_tokens; "
            f"{self.reason}"
        )


def _align(n: int) -> int:
    return max(CTX_ALIGN, n // CTX_ALIGN * CTX_ALIGN)


def default_cells(model, extend: ExtendSettings) -> int:
    """What the given (or the family's, or the default) SelfExtend setting reaches."""
    group, window = default_setting(model.info, extend)
    return _align(max_input(model.info.n_ctx_train, group, window))


def choose(
    model,
    runtime: RuntimeSettings,
    extend: ExtendSettings,
    slots: int | None = None,
    cells: int | None = None,
    memory: int | None = None,
) -> Capacity:
    """Slots and cells per slot (``runtime.ctx`` is the cells per slot when ``cells`` is None)."""
    if slots is not None and not 1 <= slots <= MAX_SLOTS:
        raise BadInputError(
            "{parallel} must be between 1 and {most}, got {slots}",
            param="parallel",
            parallel=Name("parallel"),
            most=MAX_SLOTS,
            slots=slots,
        )
    per_cell = kv_bytes_per_cell(model.info, runtime.kv_type)
    cells = cells or runtime.ctx
    on_gpu = runtime.gpu_layers > 0
    have = None if on_gpu else (memory if memory is not None else available_memory())
    budget = int(MEMORY_SHARE * have) // per_cell if have else None  # cells the machine can give
    wanted = _align(cells) if cells else default_cells(model, extend)
    if slots is None:
        fit = budget // wanted if budget else DEFAULT_SLOTS
        slots = max(1, min(DEFAULT_SLOTS, fit))
        fewer = f", fewer than the default {DEFAULT_SLOTS}, as half the available memory holds no more"
        reason = f"{slots} slot{'s' if slots > 1 else ''}{fewer if slots < DEFAULT_SLOTS else ' (the default)'}"
    else:
        reason = "as many slots as asked"
    if not cells and budget and slots * wanted > budget:
        floor = min(wanted, model.info.n_ctx_train)  # a slot smaller than the training context is of little use
        if budget // slots < floor:
            raise _too_many(slots, floor, budget, per_cell, have)
        wanted = _align(budget // slots)
        reason += f"; each slot cut to {wanted:,} cells so that all fit half the available memory ({gib(have)})"
    elif not cells:
        reason += "; each slot holds what the model family's SelfExtend setting reaches"
    return Capacity(slots, wanted, slots * wanted * per_cell, reason)


def _too_many(slots: int, floor: int, budget: int, per_cell: int, have: int) -> BadInputError:
    """--parallel beyond what memory holds: refused before anything is allocated, with what would fit."""
    fit = budget // floor
    return BadInputError(
        "{parallel} {slots} with slots of at least {floor:,} cells needs a {need} KV cache, but half the "
        "available memory ({have}) holds {fit} such slots; use {parallel} {fit_or_1} or a smaller {ctx}",
        param="parallel",
        suggested={"parallel": max(1, fit)},
        parallel=Name("parallel"),
        slots=slots,
        floor=floor,
        need=gib(slots * floor * per_cell),
        have=gib(have),
        fit=fit,
        fit_or_1=max(1, fit),
        ctx=Name("ctx"),
    )
