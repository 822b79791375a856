"""Optional features without their extra say in one line which extra to install, before any work, and the
server needs none (it is in the base install)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from selfextend_local.cli import main
from selfextend_local.testing import make_text_files

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def without(monkeypatch, *modules: str) -> None:
    """Make ``import MODULE`` fail as it does where the extra is not installed."""
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


def one_line(result, extra: str) -> str:
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and f"pip install 'selfextend-local[{extra}]'" in errors[0], result.stderr
    return errors[0]


def test_plots_without_matplotlib(tmp_path, monkeypatch):
    without(monkeypatch, "matplotlib")
    (doc,) = make_text_files(tmp_path, 1, 4000)
    ppl = CliRunner().invoke(main, ["ppl", str(doc), "--tokens", "300", "--plot", str(tmp_path / "p.png")])
    assert "drawing plots needs matplotlib" in one_line(ppl, "plot")
    passkey = CliRunner().invoke(main, ["passkey", "--lengths", "512", "--plot", str(tmp_path / "k.png")])
    assert "drawing plots needs matplotlib" in one_line(passkey, "plot")
    assert not (tmp_path / "p.png").exists()


def test_pdf_and_html_without_their_readers(tmp_path, monkeypatch):
    without(monkeypatch, "pypdf", "bs4")
    (tmp_path / "d.pdf").write_bytes(b"%PDF-1.4\n")
    (tmp_path / "d.html").write_text("<p>hi</p>")
    for name, what in (("d.pdf", "reading PDF needs pypdf"), ("d.html", "reading HTML needs beautifulsoup4")):
        result = CliRunner().invoke(main, ["qa", "--doc", str(tmp_path / name), "--no-cache", "What?"])
        assert what in one_line(result, "docs")


def test_ray_without_ray(tmp_path, monkeypatch):
    without(monkeypatch, "ray")
    (doc,) = make_text_files(tmp_path, 1)
    result = CliRunner().invoke(main, ["summarize", str(doc), "--out", str(tmp_path / "o.jsonl"), "--ray"])
    assert "--ray needs ray[data]" in one_line(result, "ray")


def test_the_server_is_in_the_base_install():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and newer
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    base = " ".join(project["dependencies"])
    assert all(package in base for package in ("fastapi", "uvicorn"))
    assert not project["optional-dependencies"]["server"]
