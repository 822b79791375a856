"""The package's shape: the engine imports nothing above it, no module imports itself back through another,
functions are short, and the public names import from the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "selfextend_local"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every selfextend_local module ``name`` imports: at module level, inside functions, and for typing."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_the_engine_imports_nothing_above_it():
    above = {
        name: sorted(t for t in targets if not t.startswith("selfextend_local.engine"))
        for name, targets in graph().items()
        if name.startswith("selfextend_local.engine")
    }
    assert {name: targets for name, targets in above.items() if targets} == {}


def test_no_module_imports_itself_back():
    edges = graph()
    cycles = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt in on_path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                on_path.add(nxt)
                visit(nxt, path + [nxt], on_path, done)
                on_path.discard(nxt)
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start}, done)
    assert cycles == []


def test_the_layout_check_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle check can fail: two modules importing each other (inside a function) are found."""
    package = tmp_path / "selfextend_local"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from . import b\n")
    (package / "b.py").write_text("from .a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    edges = graph()
    assert edges["selfextend_local.a"] == {"selfextend_local.b"} and edges["selfextend_local.b"] == {
        "selfextend_local.a"
    }
    with pytest.raises(AssertionError):
        test_no_module_imports_itself_back()


def test_functions_are_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_public_names_import_from_the_top():
    """Each in a fresh interpreter, as a user's first line would be (the old lazy loader recursed on
    `generate`, whose name is also a module's)."""
    import selfextend_local

    for name in ("generate", "stream_generate", "Llama"):
        code = f"from selfextend_local import {name}; print({name}.__module__)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().startswith("selfextend_local.")
    for name in selfextend_local.__all__:  # llama-cpp-python's own draft class, so code written for it runs
        home = "llama_cpp." if name == "LlamaPromptLookupDecoding" else "selfextend_local."
        assert getattr(selfextend_local, name).__module__.startswith(home), name


def step_calls(path: Path) -> list[str]:
    """``.step(...)`` calls in a file, as "FILE:LINE RECEIVER"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step":
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node.func.value)}")
    return found


def test_the_engine_is_stepped_in_one_place():
    """Only the scheduler steps the engine: every front end (and every test and script) is its client."""
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "scripts").glob("*.py")]
    calls = [c for path in files for c in step_calls(path)]
    engine_steps = [c for c in calls if c.endswith("engine")]
    assert [c.split(" ")[0].split(":")[0] for c in engine_steps] == ["selfextend_local/engine/scheduler.py"], calls
    assert all(c.startswith("selfextend_local/engine/") for c in calls), calls


def string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal, f-string parts included."""
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


FLAG = __import__("re").compile(r"(?<![\w-])--[a-z][a-z-]+")


def test_no_command_line_flag_is_named_below_the_cli():
    """Errors below cli/ name settings through fields (`Name("group")`), worded by each front end: a flag
    in their text would reach Python and HTTP users (and `----cache-size` came from one)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "cli" or relative.name in ("llama_build.py", "testing.py"):
            continue
        tree = ast.parse(path.read_text())
        raises = [node for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc is not None]
        for node in raises:
            found += [f"{relative}:{line} {text!r}" for line, text in string_constants(node.exc) if FLAG.search(text)]
    assert found == []
