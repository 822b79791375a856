"""Every Python block of the README runs as written, on the bundled model (a user's first contact)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.testing import start_server, stop_server

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
README_SERVER = "http://127.0.0.1:8080"  # where the README's client example expects `selfextend-local serve`


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4 and any("from selfextend_local import Llama" in b for b in BLOCKS)


@pytest.fixture(scope="module")
def server_url():
    proc, url = start_server("--parallel", "1")
    yield url
    stop_server(proc)


@pytest.mark.parametrize(
    "index",
    [pytest.param(i, marks=pytest.mark.slow) if README_SERVER in b else i for i, b in enumerate(BLOCKS)],
    ids=[f"block{i}" for i in range(len(BLOCKS))],
)
def test_a_readme_block_runs(index, tmp_path, monkeypatch, request, capsys):
    code = BLOCKS[index]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.txt").write_text(pydoc_text()[:2000])  # the README's examples read "report.txt"
    if README_SERVER in code:  # the server runs on a free port here, not on 8080
        code = code.replace(README_SERVER, request.getfixturevalue("server_url"))
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip(), "each block shows its result"
