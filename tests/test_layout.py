"""The package's layout rules (docs/architecture.md), measured by `scripts/layout_metrics.py`:
strict levels (no import cycle), no function-local import of a project module outside a CLI,
no private name used outside its module, and command lines only in ``__main__`` modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import layout_metrics  # noqa: E402


@pytest.fixture(scope="module")
def measurement() -> dict:
    return layout_metrics.measure(ROOT)


def test_no_import_cycle(measurement):
    assert measurement["import_cycles"] == []


def test_no_function_local_project_import(measurement):
    allowed = [line for line in measurement["function_local_project_imports"] if ".__main__:" in line]
    assert [line for line in measurement["function_local_project_imports"] if line not in allowed] == []


def test_no_private_name_crosses_a_module(measurement):
    assert measurement["private_cross_module_uses"] == []


def test_command_lines_live_in_main_modules():
    """argparse only in ``__main__.py`` files: library modules stay importable without a CLI."""
    offenders = []
    for path in sorted((ROOT / "dude_trl").rglob("*.py")):
        if path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names) for n in ast.walk(tree)):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_metrics_detect_a_cycle_and_a_private_use(tmp_path):
    """The measurement itself: a two-module cycle, a function-local import and a private name
    taken from a sibling are all reported."""
    package = tmp_path / "dude_trl"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import _hidden\n\ndef f():\n    from . import b\n")
    (package / "b.py").write_text("from .a import f\n_hidden = 1\n")
    result = layout_metrics.measure(tmp_path)
    assert result["import_cycles"] == [["dude_trl.a", "dude_trl.b"]]
    assert result["function_local_project_imports"] == ["dude_trl.a:4 -> dude_trl.b"]
    assert result["private_cross_module_uses"] == ["dude_trl.a:1 -> dude_trl.b._hidden"]


def test_architecture_doc_states_the_measured_levels(measurement):
    """docs/architecture.md's level table is the measured one (so the doc cannot drift)."""
    import re

    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (.+?) \|", doc, flags=re.MULTILINE)
    assert rows
    for level, modules in rows:
        for path in re.findall(r"`([\w/]+)\.py`", modules):
            name = "dude_trl." + path.replace("/", ".").removesuffix(".__init__")
            assert measurement["levels"][name] == int(level), path
