"""Pure-logic tests of the position schedules: no model, positions simulated cell by cell."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfextend_local.engine.schedules import (
    Add,
    Div,
    LlamaCppSchedule,
    NeighborSchedule,
    apply_ops,
    division_as_shifts,
    make_schedule,
    paper_relative_position,
)


def run_schedule(schedule, n_prompt: int, chunk: int, n_generate: int, on_decode=None):
    """Ingest ``n_prompt`` tokens in chunks, then generate one token at a time; return positions."""
    positions: list[int] = []
    sizes = [min(chunk, n_prompt - i) for i in range(0, n_prompt, chunk)] + [1] * n_generate
    for n in sizes:
        positions = apply_ops(positions, schedule.prepare())
        first = len(positions)
        positions += [schedule.next_pos + i for i in range(n)]
        schedule.advance(n)
        if on_decode:
            on_decode(schedule, positions, first)
    return positions


def paper_row(i: int, group: int, window: int) -> np.ndarray:
    j = np.arange(i + 1)
    grouped = i // group - j // group + window - window // group
    return np.where(i - j < window, i - j, grouped)


def check_neighbor_queries(schedule: NeighborSchedule, positions: list[int], first: int) -> None:
    """Every query of the decode sees the paper's relative positions, or at most e*(1-1/G) farther."""
    G, W, g = schedule.group, schedule.window, schedule.n_grouped
    pos = np.asarray(positions)
    for i in range(first, len(positions)):
        ours = pos[i] - pos[: i + 1]
        diff = ours - paper_row(i, G, W)
        e = max(0, i - g - W)
        if e == 0:
            assert not diff.any(), f"query {i}: tail is W but positions differ from the paper"
        else:
            assert diff.min() >= 0 and diff.max() <= e - e // G, f"query {i}: off by {diff.max()} (e={e})"


def neighbor_layout(n: int, g: int, group: int) -> list[int]:
    return [j // group if j < g else g // group + (j - g) for j in range(n)]


@pytest.mark.parametrize(
    ("group", "window", "chunk", "n_prompt", "n_generate"),
    [
        (4, 256, 512, 3000, 40),
        (8, 128, 64, 2000, 33),
        (4, 1024, 512, 4500, 9),
        (2, 64, 1, 400, 10),
        (3, 96, 100, 1500, 7),
    ],
)
def test_neighbor_matches_paper(group, window, chunk, n_prompt, n_generate):
    schedule = NeighborSchedule(group, window)
    positions = run_schedule(schedule, n_prompt, chunk, n_generate, check_neighbor_queries)
    assert positions == neighbor_layout(len(positions), schedule.n_grouped, group)
    assert schedule.n_grouped > 0
    assert schedule.next_pos == max(positions) + 1


@settings(max_examples=60, deadline=None)
@given(
    group=st.integers(2, 8),
    blocks=st.integers(1, 8),
    chunk=st.integers(1, 70),
    n_prompt=st.integers(1, 400),
    n_generate=st.integers(0, 20),
)
def test_neighbor_property(group, blocks, chunk, n_prompt, n_generate):
    schedule = NeighborSchedule(group, group * blocks)
    positions = run_schedule(schedule, n_prompt, chunk, n_generate, check_neighbor_queries)
    assert positions == neighbor_layout(len(positions), schedule.n_grouped, group)
    # tail after the last grouping: W .. W+G-1 plus whatever was decoded since
    assert schedule.n_grouped % group == 0


def test_neighbor_generation_groups_every_g_tokens():
    schedule = NeighborSchedule(4, 64)
    run_schedule(schedule, 500, 100, 0)
    schedule.prepare()  # the decode after the prompt groups the prompt's last chunk
    grouped = [schedule.n_grouped]
    for _ in range(13):  # decodes at t = 500 .. 512 group at 504, 508 and 512
        schedule.prepare()
        schedule.advance(1)
        grouped.append(schedule.n_grouped)
    steps = [b - a for a, b in zip(grouped, grouped[1:]) if b != a]
    assert steps and all(s == 4 for s in steps)
    assert len(steps) == 3


def completion_tool_loop(n_prompt: int, n_generate: int, G: int, W: int):
    """A line-by-line transliteration of llama.cpp's tools/completion self-extend loop.

    Records the calls in order as tuples and returns them with the positions of all cells.
    """
    calls: list[tuple] = []
    cells: list[int] = []
    n_past, ga_i = 0, 0
    embds = [min(W, n_prompt - i) for i in range(0, n_prompt, W)] + [1] * n_generate
    for n_embd in embds:
        while n_past >= ga_i + W:
            ib = (G * ga_i) // W
            bd = (W // G) * (G - 1)
            dd = (W // G) - ib * bd - W
            calls.append(("seq_add", ga_i, n_past, ib * bd))
            calls.append(("seq_div", ga_i + ib * bd, ga_i + ib * bd + W, G))
            calls.append(("seq_add", ga_i + ib * bd + W, n_past + ib * bd, dd))
            for lo, hi, move in [
                (ga_i, n_past, ("add", ib * bd)),
                (ga_i + ib * bd, ga_i + ib * bd + W, ("div", G)),
                (ga_i + ib * bd + W, n_past + ib * bd, ("add", dd)),
            ]:
                kind, value = move
                cells = [(p + value if kind == "add" else p // value) if lo <= p < hi else p for p in cells]
            n_past -= bd
            ga_i += W // G
        cells += list(range(n_past, n_past + n_embd))
        n_past += n_embd
    return calls, cells


@pytest.mark.parametrize(
    ("group", "window", "n_prompt", "n_generate"), [(4, 512, 5000, 700), (8, 256, 3000, 300), (2, 64, 333, 65)]
)
def test_llamacpp_reproduces_completion_tool(group, window, n_prompt, n_generate):
    expected_calls, expected_cells = completion_tool_loop(n_prompt, n_generate, group, window)

    schedule = LlamaCppSchedule(group, window)
    calls: list[tuple] = []

    positions: list[int] = []
    sizes = [min(window, n_prompt - i) for i in range(0, n_prompt, window)] + [1] * n_generate
    for n in sizes:
        ops = schedule.prepare()
        calls += [("seq_add", o.p0, o.p1, o.delta) if isinstance(o, Add) else ("seq_div", o.p0, o.p1, o.d) for o in ops]
        positions = apply_ops(positions, ops)
        positions += [schedule.next_pos + i for i in range(n)]
        schedule.advance(n)

    assert calls == expected_calls
    assert positions == expected_cells
    # the completion tool's layout: every token below G*ga_i grouped, the rest exact
    assert positions == neighbor_layout(len(positions), group * schedule.ga_i, group)


def test_llamacpp_tail_can_shrink_to_zero():
    """The documented weakness: right after a block is grouped, the newest token sees no exact tail."""
    schedule = LlamaCppSchedule(4, 64)
    run_schedule(schedule, 128, 64, 0)
    schedule.prepare()
    assert schedule.next_pos == schedule.ga_i  # nothing exact left above the grouped block


def test_apply_ops_semantics():
    assert apply_ops([0, 1, 2, 3, 4, 5], [Div(2, 6, 2)]) == [0, 1, 1, 1, 2, 2]
    assert apply_ops([0, 1, 2, 3], [Add(1, -1, 10)]) == [0, 11, 12, 13]
    assert apply_ops([0, 1, 2, 3], [Add(1, 3, -1)]) == [0, 0, 1, 3]
    with pytest.raises(ValueError):
        apply_ops([0, 1], [Add(0, -1, -1)])


def test_paper_formula_meets_at_window():
    G, W = 4, 16
    assert paper_relative_position(100, 100 - W + 1, G, W) == W - 1
    assert paper_relative_position(100, 100 - W, G, W) in (W - 1, W)


def test_restore_round_trip():
    schedule = NeighborSchedule(4, 64)
    run_schedule(schedule, 700, 50, 3)
    again = NeighborSchedule.restore(4, 64, schedule.state())
    assert again.state() == schedule.state() and again.next_pos == schedule.next_pos


def test_cut_position_refuses_inside_grouped_region():
    schedule = NeighborSchedule(4, 64)
    run_schedule(schedule, 700, 50, 0)
    g = schedule.n_grouped
    assert schedule.cut_position(g + 64) == g // 4 + 64
    assert schedule.cut_position(g + 10) is None
    assert make_schedule("neighbor", 1, 64).cut_position(5) == 5


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 70), st.integers(0, 90), st.integers(1, 9), st.integers(1, 6), st.integers(0, 5), st.integers(0, 5)
)
def test_division_as_shifts_equals_division(p0, length, d, fold, below, above):
    """The shifts move exactly the cells of [p0, p1) to p // d, whatever lies below and above."""
    p1 = p0 + length
    cells = list(range(max(p0 - below, 0), p1 + above))
    ops = division_as_shifts(p0, p1, d, fold)
    assert all(isinstance(op, Add) for op in ops)
    assert apply_ops(cells, ops) == apply_ops(cells, [Div(p0, p1, d)])


@pytest.mark.parametrize("d, calls", [(2, 1), (4, 2), (8, 3), (3, 2), (6, 3)])
@pytest.mark.parametrize("fold", [1, 4, 64])
def test_division_as_shifts_needs_log2_calls_a_group_and_one_a_run(d, calls, fold):
    groups = 64
    assert len(division_as_shifts(d * 10, d * (10 + groups), d, fold)) == groups * calls + groups // fold
