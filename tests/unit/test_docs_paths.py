"""The documents name only what exists: code paths, the Layout's modules, the CI skips.

A renamed or deleted file leaves a document pointing at nothing, and a reader then
trusts a path that is gone (docs/NIGHTLY.md cited testbed/images.py long after it
moved). So every path in backticks that starts at a top-level entry of the repository
(or, in cachemodel/README.md, at the document's own folder) must exist; a glob must
match something; a bare `name.py`, `name.c` or `name.h` must be some file's name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from testbed.settings import REPO_ROOT
from tests.conftest import ALLOWED_SKIPS

DOCUMENTS = sorted([REPO_ROOT / "README.md", REPO_ROOT / "cachemodel" / "README.md",
                    *(REPO_ROOT / "docs").glob("*.md")])

# Folders created at run time: paths under them (`results/<run-id>/`, `.cache/qemu/`)
# are examples of what a run makes, not files of the repository.
RUNTIME_ROOTS = {"results", ".cache"}

# Files of other projects that the cache model's documents name (QEMU's headers).
EXTERNAL_FILES = {"qemu-plugin.h", "plugin-memory.h"}

# Documents and modules other branches add; the lead empties this at merge, once
# they exist (docs/kernels.md etc. are linked from the README before they land).
PENDING: set[str] = set()

CODE = re.compile(r"`([^`\s]+)`")
TOP_LEVEL = {p.name for p in REPO_ROOT.iterdir()} - {".git"} - RUNTIME_ROOTS


def named_paths(text: str) -> list[str]:
    """Backticked words that look like paths: a slash, or a code file's extension."""
    out = []
    for word in CODE.findall(text):
        word = word.rstrip(".,;:")
        if "/" in word or re.search(r"\.(py|c|h|md|yaml|toml|sh)$", word):
            out.append(word)
    return out


def _exists(path: str, base: Path) -> bool:
    clean = path.split("::")[0].rstrip("/")
    for root in (base, REPO_ROOT):
        candidate = root / clean
        if any(ch in clean for ch in "*?[") and any(root.glob(clean)):
            return True
        if candidate.exists():
            return True
    return False


def _repo_file_names() -> set[str]:
    skip = {".git", "node_modules", "__pycache__", *RUNTIME_ROOTS}
    names: set[str] = set()
    for _, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        names.update(files)
    return names


def broken_paths(doc: Path, names: set[str]) -> list[str]:
    base = doc.parent
    local = {p.name for p in base.iterdir()}
    broken = []
    for path in named_paths(doc.read_text()):
        if path in PENDING or path in EXTERNAL_FILES:
            continue
        if "<" in path:  # a placeholder: the folder before it must exist
            path = path.split("<")[0]
            if "/" not in path:
                continue
        first = path.split("/")[0]
        rooted = first in TOP_LEVEL or first in local or first == ".."
        if "/" in path:
            if rooted and not _exists(path, base):
                broken.append(path)
        elif re.search(r"\.(py|c|h)$", path) and path not in names:
            broken.append(path)
    return broken


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: str(d.relative_to(REPO_ROOT)))
def test_every_code_path_a_document_names_exists(doc: Path) -> None:
    assert broken_paths(doc, _repo_file_names()) == []


def test_the_path_check_finds_a_stale_path(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("see `testbed/images.py`, `testbed/build/images.py`, `images/tools/*.c`,\n"
                   "`model_selftest.c`, `model.c`, `results/<run-id>/`, `report.md`,\n"
                   "`tests/<x>/a.py` and `testbed/nowhere/<x>.py`.\n")
    assert broken_paths(doc, _repo_file_names()) == ["testbed/images.py", "model_selftest.c",
                                                         "testbed/nowhere/"]


# --------------------------------------------------------------------------- Layout

PACKAGES = ("testbed", "testbed/formats", "testbed/experiment", "testbed/build", "testbed/vm",
            "testbed/run", "analysis", "benchmarks")


def layout_modules(readme: str) -> dict[str, set[str]]:
    """README's Layout block: a directory line, then its modules on lines indented by
    exactly two spaces (names, each with an optional parenthesised job)."""
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    modules: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        if line and not line[0].isspace():
            head = line.split()[0]
            current = head.rstrip("/") if head.endswith("/") else None
            if current is not None:
                modules.setdefault(current, set())
        elif current is not None and re.match(r"  \S", line):
            names = re.sub(r"\([^)]*\)", " ", line).split()
            modules[current].update(names)
    return modules


def test_the_layout_lists_every_module_and_only_modules() -> None:
    listed = layout_modules((REPO_ROOT / "README.md").read_text())
    for package in PACKAGES:
        actual = {p.stem for p in (REPO_ROOT / package).glob("*.py") if p.stem != "__init__"}
        pending = {Path(p).stem for p in PENDING if Path(p).parent.as_posix() == package}
        names = listed.get(package, set())
        assert actual - names == set(), f"{package}: missing from the README's Layout"
        assert names - actual - pending == set(), f"{package}: in the Layout, not on disk"


# --------------------------------------------------------------------------- CI skips


def test_the_readme_lists_every_skip_ci_allows() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    rows = [line.split("|")[1].strip() for line in readme.splitlines()
            if line.startswith("| ")]
    for skip in ALLOWED_SKIPS:
        assert skip.label in rows, f"README's skip table lacks {skip.label!r}"
