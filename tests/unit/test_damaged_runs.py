"""A run folder damaged after the run (copies of tests/fixtures/runs/*): analysis and the
report finish, the damaged repetitions are `failed` rows with the reason and no number,
never zeros or a traceback; unknown files are ignored. (Resume redoing exactly the
damaged ones: tests/unit/test_loop.py; end to end: tests/integration/test_faults.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis import pipeline
from testbed.run.folder import RunDir, file_sizes

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "runs"


def as_current_runner(run: RunDir) -> None:
    """Give the fixture's done markers the file listing today's runner writes."""
    for rep in run.reps():
        if rep.is_done:
            info = json.loads(rep.file("done").read_text())
            rep.file("done").write_text(json.dumps({**info, "files": file_sizes(rep.path)}))


@pytest.fixture(params=["20261125T100000Z-hostloop", "20261129T143000Z-window"])
def damaged(request, tmp_path: Path) -> tuple[RunDir, dict[str, tuple[str, int]]]:
    run = RunDir(tmp_path / request.param)
    shutil.copytree(FIXTURES / request.param, run.path)
    as_current_runner(run)
    done = [r for r in run.reps() if r.is_done]
    assert len(done) >= 3
    truncated, cut, partial = done[0], done[1], done[2]
    truncated.file("done").write_bytes(truncated.file("done").read_bytes()[:30])
    raw = cut.file("proc-after/softirqs")
    raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    partial.file("done").unlink()
    (done[-1].path / "mystery.bin").write_bytes(b"\x00\xff" * 10)
    (run.path / "stray.txt").write_text("unknown\n")
    (run.path / "cells" / "not-a-cell.txt").write_text("unknown\n")
    return run, {"truncated": (truncated.cell_id, truncated.repetition),
                 "cut": (cut.cell_id, cut.repetition),
                 "partial": (partial.cell_id, partial.repetition)}


def statuses(tidy: pd.DataFrame) -> pd.DataFrame:
    return tidy[tidy["metric"] == "rep.status"].set_index(["cell_id", "repetition"])


def test_analyze_and_report_show_damage_as_failed_with_the_reason(damaged):
    run, which = damaged
    result = pipeline.analyze_run(run.path)
    st = statuses(result.tidy)
    assert st.loc[which["truncated"], "status"] == "failed"
    assert "run folder damaged" in st.loc[which["truncated"], "note"]
    assert "unreadable" in st.loc[which["truncated"], "note"]
    assert st.loc[which["cut"], "status"] == "failed"
    assert "proc-after/softirqs has" in st.loc[which["cut"], "note"]
    assert st.loc[which["partial"], "status"] == "incomplete"
    for key in which.values():
        rows = result.tidy[(result.tidy["cell_id"] == key[0])
                           & (result.tidy["repetition"] == key[1])]
        assert len(rows) == 1 and rows["value"].isna().all()  # the status row, no numbers
    paths = pipeline.write_report(run.path)
    assert paths.html.is_file() and paths.md.is_file()
    assert "run folder damaged" in paths.md.read_text()
