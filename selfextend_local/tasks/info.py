"""A model's card: what it is, whether SelfExtend applies, and how far each setting reaches."""

from __future__ import annotations

from ..engine.errors import CLI, Naming
from ..engine.model import Model
from ..engine.planning import GROUPS, default_window, max_input
from ..engine.registry import family_for

WINDOWS = (256, 512, 1024, 2048, 4096)


def reach_table(n_ctx_train: int, groups=GROUPS, windows=WINDOWS) -> list[list[str]]:
    """Rows of ``W`` then the largest input for each ``G``: ``(L - W) * G + W``."""
    rows = [["W \\ G", *[str(g) for g in groups]]]
    for w in windows:
        if w < n_ctx_train:
            rows.append([str(w), *[f"{max_input(n_ctx_train, g, w):,}" if w % g == 0 else "-" for g in groups]])
    return rows


def format_table(rows: list[list[str]], align_left: bool = False) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    pad = str.ljust if align_left else str.rjust
    return "\n".join("  ".join(pad(cell, w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def division_line(model: Model, runtime=None) -> str:
    """Which llama.cpp build is loaded and the division it gives (probed on the model)."""
    from ..engine.division import HOW_TO_FIX, build_description
    from ..engine.planning import Plan
    from ..engine.session import Session

    plan = Plan(4, 64, "neighbor", "auto", 256, model.info.n_ctx_train, "probe")
    with Session(model, plan, runtime) as session:
        divider = session.divider
    advice = "" if divider.name == "native" else f"; {HOW_TO_FIX}"
    return f"{build_description()}: division {divider.name}, probe KL {divider.probe.kl:.3g}{advice}"


def kshift_line(info, naming: Naming = CLI) -> str:
    """Whether this build can shift a quantized (and a bf16) K of this model, or why not (and what to do,
    with settings named as ``naming`` names them)."""
    import llama_cpp

    from ..engine.kshift import CRASH_FIX, crash_reason

    reasons = {kind: crash_reason(info, kind, llama_cpp.__version__) for kind in ("q8_0", "bf16")}
    if not any(reasons.values()):
        return "quantized and bf16 K caches can be self-extended with this build (each type probed on first use)"
    fix = CRASH_FIX.format(kv_type=naming.name("kv_type"))
    return "; ".join(f"{kind}: {why}; {fix}" for kind, why in reasons.items() if why)


def kv_table(info) -> str:
    """Bytes a token takes in the KV cache with each type, and how many tokens the memory there is holds
    (the share a context may take of it, as the --ctx check counts)."""
    from ..engine.memory import HEADROOM, available_memory, kv_bytes_per_cell
    from ..engine.settings import KV_TYPES

    have = available_memory()
    room = f"tokens in {human_size(HEADROOM * have) if have else '?'}"
    rows = [["type", "bytes/token", "of f16", room, "perplexity 4k / 12k G4", "prompt speed 12k G4"]]
    f16 = kv_bytes_per_cell(info, "f16")
    for kind in KV_TYPES:
        per = kv_bytes_per_cell(info, kind)
        tokens = f"{int(HEADROOM * have) // per:,}" if have else "?"
        rows.append([kind, f"{per:,}", f"{per / f16:.2f}", tokens, *_cost(kind)])
    note = "perplexity and prompt speed against f16's, measured on SmolLM2-135M-Instruct (docs/RESULTS.md); "
    note += "-: not measured"
    return format_table(rows) + "\n" + note


def _cost(kind: str) -> list[str]:
    import llama_cpp

    from ..engine.build import TILED_QUANTIZED_FA, patch_level
    from ..engine.kvtypes import COSTS

    cost = COSTS.get(kind)
    if cost is None:
        return ["-", "-"]
    ours = patch_level(llama_cpp.__version__) >= TILED_QUANTIZED_FA
    return [f"{cost.ppl_4k:+.2%} / {cost.ppl_12k:+.2%}", f"{cost.speed_ours if ours else cost.speed_stock:.2f}x"]


def describe(model: Model, runtime=None, naming: Naming = CLI) -> str:
    """The model's card, with settings named as ``naming`` names them (flags by default)."""
    import llama_cpp

    from ..engine.build import fa_kernel, kshift_kind

    info = model.info
    family = family_for(info)
    reason = info.extendable_reason
    lines = [
        f"name:              {info.name}",
        f"file:              {info.path}",
        f"architecture:      {info.architecture}",
        f"training context:  {info.n_ctx_train:,} tokens",
        f"rope:              {info.rope_type}, base {info.rope_freq_base or 'default'}, scaling {info.rope_scaling}",
        f"quantization:      {info.quantization}",
        f"size:              {human_size(info.size_bytes)}, {info.n_params / 1e6:,.0f}M parameters, "
        f"{info.n_layers} layers",
        f"chat template:     {'yes' if info.chat_template else 'no'}",
        f"self-extend:       {'yes' if reason is None else 'no: ' + reason}",
    ]
    if family:
        reach = max_input(info.n_ctx_train, family.group, family.window)
        lines.append(
            f"recommended:       {naming.setting({'group': family.group, 'window': family.window})} "
            f"(family {family.family}, reaches {reach:,} tokens; {family.source})"
        )
    else:
        lines.append(
            f"recommended:       planned per input, window {default_window(info.n_ctx_train)} (no registry entry)"
        )
    if reason is None:
        lines.append(f"llama.cpp:         {division_line(model, runtime)}")
        lines.append(f"quantized K:       {kshift_line(info, naming)}")
        lines.append(f"K-shift rotates:   {kshift_kind(llama_cpp.__version__)}")
    lines.append(f"quantized KV:      flash attention {fa_kernel(llama_cpp.__version__)}")
    lines += ["", "KV cache types (K and V), and the tokens the available memory holds with each:", kv_table(info)]
    if reason is None:
        lines += [
            "",
            "Largest input (tokens) by window W and group G, (L - W) * G + W:",
            format_table(reach_table(info.n_ctx_train)),
        ]
    return "\n".join(lines)
