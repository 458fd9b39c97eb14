"""Importing analysis (the package, its pipeline) has no side effects and loads none of the
code that runs guests; the package holds no logic and no module reaches a sibling through it."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from testbed.settings import REPO_ROOT
from testbed.shell import HostShell

pytestmark = pytest.mark.process  # compiles C, starts processes or opens sockets

PROBE = """
import json, signal, sys
before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
import analysis.pipeline
after = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
print(json.dumps({"signals_kept": before == after,
                  "modules": sorted(m for m in sys.modules if m.startswith("testbed"))}))
"""


def test_importing_analysis_keeps_signal_handlers_and_skips_the_runner():
    out = HostShell(cwd=REPO_ROOT).run([sys.executable, "-c", PROBE], timeout=120).stdout
    seen = json.loads(out)
    assert seen["signals_kept"]
    loaded = set(seen["modules"])
    assert not {m for m in loaded if m.startswith(("testbed.vm", "testbed.run.loop",
                                                   "testbed.build", "testbed.experiment"))}
    assert "testbed.run.folder" in loaded and "testbed.formats.procfs" in loaded


ANALYSIS = REPO_ROOT / "analysis"


def _package_imports(path: Path) -> list[str]:
    """`import analysis` / `from analysis import x` statements in a module: each runs the
    package's __init__ to reach a sibling, the route of the old package-level cycle."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "analysis" and node.level == 0:
            found.append(f"{path.name}:{node.lineno}: from analysis import "
                         + ", ".join(a.name for a in node.names))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append(f"{path.name}:{node.lineno}: relative import")
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names
                      if a.name == "analysis"]
    return found


def test_no_analysis_module_imports_the_package_for_a_sibling():
    offenders = [hit for f in sorted(ANALYSIS.glob("*.py")) for hit in _package_imports(f)]
    assert not offenders, "import the sibling module itself (from analysis.x import y): " \
        + "; ".join(offenders)


def test_the_package_init_holds_no_logic():
    tree = ast.parse((ANALYSIS / "__init__.py").read_text())
    kinds = [type(n).__name__ for n in tree.body]
    assert kinds == ["Expr"], f"analysis/__init__.py should hold its docstring only: {kinds}"


def test_the_check_catches_the_old_cycle(tmp_path):
    bad = tmp_path / "report.py"
    bad.write_text("from analysis import repeatability\nimport analysis\n")
    assert len(_package_imports(bad)) == 2
