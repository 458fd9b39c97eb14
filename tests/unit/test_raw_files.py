"""Every file of a captured run folder is declared by a testbed.formats module.

Each formats module owns the raw files it parses (its `FILES`, names or glob patterns
relative to a repetition folder); testbed.formats.record owns the runner's own records
(and `RUN_FILES` at the run's top level). A file nobody declares is a name written as a
string literal somewhere, which is how the runner and the analysis drift apart.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from pathlib import Path

import pytest

import testbed.formats
from testbed.formats import record

RUNS = Path(__file__).resolve().parent.parent / "fixtures" / "runs"
# Not part of any run: the fixtures' own documentation and capture script.
FIXTURE_NOTES = ("README.md", "capture_host_run.py")


def declared() -> dict[str, str]:
    """pattern -> the module that declares it."""
    out: dict[str, str] = {}
    for info in pkgutil.iter_modules(testbed.formats.__path__):
        mod = importlib.import_module(f"testbed.formats.{info.name}")
        for name in getattr(mod, "FILES", ()):
            assert name not in out, f"{name} declared by both {out[name]} and {info.name}"
            out[name] = info.name
    return out


def _declared_here(rel: Path, patterns: dict[str, str]) -> bool:
    if rel.parts[0] == "cells" and len(rel.parts) >= 4:  # cells/<cell>/rep-<n>/<file>
        name = "/".join(rel.parts[3:])
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)
    if len(rel.parts) == 1:
        return rel.name in (*record.RUN_FILES, *FIXTURE_NOTES)
    return rel.parts[0] in ("analysis", "symbols")  # analysis output, symbol tables


def undeclared(run: Path, patterns: dict[str, str]) -> list[str]:
    return [str(p.relative_to(run)) for p in sorted(run.rglob("*"))
            if p.is_file() and not _declared_here(p.relative_to(run), patterns)]


@pytest.mark.parametrize("run", sorted(p.name for p in RUNS.iterdir() if p.is_dir()))
def test_every_raw_file_of_a_captured_run_is_declared(run: str) -> None:
    bad = undeclared(RUNS / run, declared())
    assert not bad, ("files no testbed.formats module declares (add the name to the FILES "
                     f"of the module that parses it, or to formats/record.py): {bad}")


def test_an_undeclared_file_is_found(tmp_path: Path) -> None:
    rep = tmp_path / "cells" / "c" / "rep-1"
    rep.mkdir(parents=True)
    (rep / "netperf.txt").write_text("")
    (rep / "mystery.txt").write_text("")
    (tmp_path / "cells.json").write_text("[]")
    assert undeclared(tmp_path, declared()) == ["cells/c/rep-1/mystery.txt"]
