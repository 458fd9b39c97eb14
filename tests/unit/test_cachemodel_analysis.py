"""analysis/symbols.py on a run folder, and the runner's side of attribution
(testbed/run/cachemodel_window.py): tables copied per window, symbols kept once."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from analysis.report import render_md
from analysis.symbols import (
    C2C_COLUMNS,
    SYMBOL_COLUMNS,
    report_sections,
    write_attribution_tables,
)
from testbed.errors import NetbedError
from testbed.formats import cachemodel as cmfmt
from testbed.formats import symbols as symfmt
from testbed.run import cachemodel_window as cw
from testbed.run.folder import RunDir
from testbed.shell import Result

KALLSYMS = ("ffffffff81000000 T _text\nffffffff81000100 T copy_user_generic\n"
            "ffffffff81000200 T tcp_recvmsg\nffffffffc0000000 t e1000_clean_rx_irq\t[e1000]\n")
HEAD = ",".join(cmfmt.SITES_COLUMNS)


def sites_csv(window: int, copy_loads: int) -> str:
    rows = [f"{window},0xffffffff81000104,1,kernel,cpu,{copy_loads},{copy_loads},10,5,1,0,0,0",
            f"{window},0xffffffff81000104,1,kernel,device,{copy_loads * 2},0,64,64,0,0,0,0",
            f"{window},0xffffffffc0000010,0,kernel,device,50,0,50,50,0,0,0,50",
            f"{window},0x555555554321,1,user,cpu,7,3,0,0,0,0,0,0"]
    return HEAD + "\n" + "\n".join(rows) + "\n"


def c2c_csv(window: int) -> str:
    return ("window,line,vcpu,pc,owner_vcpu,owner_pc,count\n"
            f"{window},0x10040,1,0xffffffff81000104,0,0xffffffffc0000010,30\n"
            f"{window},0x10080,0,0xffffffff81000210,1,0x0,5\n")


def make_run(tmp: Path) -> Path:
    run = tmp / "run"
    name, blob = symfmt.compress_table(KALLSYMS)
    (run / symfmt.SYMBOLS_DIR).mkdir(parents=True)
    (run / symfmt.SYMBOLS_DIR / name).write_bytes(blob)
    for policy, loads in (("pin-same", 100), ("pin-cross", 400)):
        for r in range(2):
            rep = run / "cells" / f"distro-e1000-2-{policy}" / f"rep-{r}"
            rep.mkdir(parents=True)
            (rep / "cell.json").write_text(json.dumps(
                {"kernel": "distro", "nic": "e1000", "cpus": 2, "policy": policy,
                 "workload": {"name": "TCP_STREAM", "message_size": 16384}, "gro": True}))
            # stored compressed by the runner; a plain file is read as well
            (rep / (cmfmt.SITES_FILE + ".gz")).write_bytes(
                gzip.compress(sites_csv(r + 1, loads).encode()))
            (rep / cmfmt.C2C_FILE).write_text(c2c_csv(r + 1))
            (rep / symfmt.SYMBOLS_REF).write_text(json.dumps(
                {"kernel": f"{symfmt.SYMBOLS_DIR}/{name}", "user": None}))
            (rep / "done").write_text("{}")
    # an unfinished repetition is left out
    bad = run / "cells" / "distro-e1000-2-pin-same" / "rep-2"
    bad.mkdir()
    (bad / cmfmt.SITES_FILE).write_text(sites_csv(3, 10**9))
    return run


def test_tables_are_tidy_and_resolved(tmp_path):
    run = make_run(tmp_path)
    paths = write_attribution_tables(run)
    assert paths is not None
    sym = pd.read_parquet(paths.parquet)
    assert tuple(sym.columns) == SYMBOL_COLUMNS
    assert sorted(set(sym["repetition"])) == [0, 1] and sym["value"].max() < 10**9
    got = sym.groupby(["policy", "symbol", "data", "event"])["value"].sum()
    assert got[("pin-cross", "copy_user_generic", "device", "loads")] == 2 * 800
    assert got[("pin-same", "e1000_clean_rx_irq [e1000]", "device", "device_writes")] == 100
    assert "[user:pie-exe]" in set(sym["symbol"])
    assert pd.read_csv(paths.csv).shape[0] == len(sym)
    c2c = pd.read_csv(paths.c2c_csv)
    assert tuple(c2c.columns) == C2C_COLUMNS
    first = c2c[(c2c["rank"] == 1) & (c2c["policy"] == "pin-same") & (c2c["repetition"] == 0)]
    assert set(first["line"]) == {"0x10040"} and set(first["line_c2c"]) == {30}
    sides = dict(zip(first["side"], first["symbol"], strict=True))
    assert sides == {"requester": "copy_user_generic", "owner": "e1000_clean_rx_irq [e1000]"}
    second = c2c[(c2c["rank"] == 2) & (c2c["side"] == "owner")]
    assert set(second["symbol"]) == {"[unknown]"}


def test_report_section_puts_policies_side_by_side(tmp_path):
    run = make_run(tmp_path)
    write_attribution_tables(run)
    sections = report_sections(run)
    titles = [t for t, _, _ in sections]
    assert any(t.startswith("Top symbols: distro/e1000/2cpu") for t in titles)
    table = next(p for t, k, p in sections if t.startswith("Top symbols"))
    assert list(table.columns[:2]) == ["pin-same: loads (n=2)", "pin-cross: loads (n=2)"]
    assert table.iloc[0, 1].startswith("copy_user_generic 1,200 (67% dev)")
    md = render_md(_Prov(), sections, [], run)
    assert "private misses" in md and "c2c" in md


class _Prov:
    run_id = "test"


def test_no_attribution_no_tables(tmp_path):
    (tmp_path / "run" / "cells").mkdir(parents=True)
    assert write_attribution_tables(tmp_path / "run") is None
    assert report_sections(tmp_path / "run") == []


def test_a_missing_symbol_table_is_named(tmp_path):
    run = make_run(tmp_path)
    for f in (run / symfmt.SYMBOLS_DIR).iterdir():
        f.unlink()
    with pytest.raises(NetbedError, match="which is missing"):
        write_attribution_tables(run)


# ---------------------------------------------------------------- runner side
def snapshot_blocks(markers: list[str]) -> str:
    rows = ["vcpu,mode,event,value,marker"]
    for i, m in enumerate(markers):
        rows += [f"0,{mode},{ev},{i},{m}" for mode in cmfmt.MODES for ev in cmfmt.EVENTS]
    return "\n".join(rows) + "\n"


def test_window_tables_are_copied_when_they_belong_to_the_measured_window(tmp_path):
    work, run = tmp_path / "work", RunDir(tmp_path / "run")
    work.mkdir()
    (work / cw.CSV_NAME).write_text(snapshot_blocks(["begin:1", "end:1", "begin:1", "end:1"]))
    (work / cmfmt.SITES_FILE).write_text(sites_csv(2, 5))
    (work / cmfmt.C2C_FILE).write_text(c2c_csv(2))
    rep = run.start_rep("c", 0)
    cw.collect_window(work, rep, {"kernel": "symbols/x.txt.gz"})
    assert cmfmt.stored_text(rep.path, cmfmt.SITES_FILE) == sites_csv(2, 5)
    assert rep.file(cmfmt.SITES_FILE + ".gz").is_file()
    assert json.loads(rep.file(symfmt.SYMBOLS_REF).read_text())["kernel"] == "symbols/x.txt.gz"
    (work / cmfmt.SITES_FILE).write_text(sites_csv(1, 5))  # a stale table
    with pytest.raises(NetbedError, match=r"window\(s\) \[1\], the measured one is 2"):
        cw.collect_window(work, run.start_rep("c", 1))


def test_the_host_waits_for_the_writer_thread_then_copies_that_windows_tables(tmp_path):
    work, run = tmp_path / "work", RunDir(tmp_path / "run")
    work.mkdir()
    (work / cw.CSV_NAME).write_text(snapshot_blocks(["begin:0", "end:0", "begin:1", "end:1"]))
    (work / cmfmt.SITES_FILE).write_text(sites_csv(1, 5))  # the throw-away window's
    (work / cmfmt.C2C_FILE).write_text(c2c_csv(1))
    done = work / cmfmt.TABLES_WINDOW_FILE
    done.write_text("1\n")  # the plugin's writer has not finished window 2 yet
    with pytest.raises(NetbedError, match=r"tables of window 2 within 0 s "
                                          r"\(last finished: window 1"):
        cw.collect_window(work, run.start_rep("c", 0), tables_wait_s=0)
    (work / cmfmt.SITES_FILE).write_text(sites_csv(2, 5))
    (work / cmfmt.C2C_FILE).write_text(c2c_csv(2))
    done.write_text("2\n")
    rep = run.start_rep("c", 1)
    cw.collect_window(work, rep, tables_wait_s=0)
    assert cmfmt.stored_text(rep.path, cmfmt.SITES_FILE) == sites_csv(2, 5)


def test_waiting_for_tables_polls_until_the_window_is_done_and_is_bounded(tmp_path):
    path = tmp_path / cmfmt.TABLES_WINDOW_FILE
    now = [0.0]
    writes = {0.1: "2", 0.2: "3"}  # the writer finishes window 2, later window 3

    def sleep(s: float) -> None:
        now[0] = round(now[0] + s, 2)
        if now[0] in writes:
            path.write_text(writes[now[0]] + "\n")

    path.write_text("1\n")
    assert cw.wait_for_tables(path, 3, 5, clock=lambda: now[0], sleep=sleep) == 3
    assert now[0] == 0.2
    assert cw.wait_for_tables(path, 2, 5, clock=lambda: now[0], sleep=sleep) == 3  # later
    path.unlink()
    with pytest.raises(NetbedError, match=r"within 1 s \(last finished: none"):
        cw.wait_for_tables(path, 1, 1, clock=lambda: now[0], sleep=sleep)
    assert now[0] == pytest.approx(1.2)
    path.write_text("garbage")
    with pytest.raises(NetbedError, match="expected a window number"):
        cw.wait_for_tables(path, 1, 1, clock=lambda: now[0], sleep=sleep)


def test_the_throw_away_region_counts_in_the_window_numbers_but_not_in_the_window():
    text = snapshot_blocks(["begin:0", "end:0", "begin:1", "end:1"])
    assert cw.closes_before(text) == 2  # the plugin's second window: its tables say 2
    blocks = cw.window_blocks(text)
    assert set(cmfmt.read_snapshots(blocks)["marker"]) == {"begin:1", "end:1"}


def test_the_model_is_armed_by_one_region_of_its_own():
    shell = FakeShell("")
    cw.arm_model(shell)
    assert shell.commands == [f"nbmark begin {cw.ARMING_REGION} && "
                              f"nbmark end {cw.ARMING_REGION}"]


class FakeShell:
    def __init__(self, stdout: str) -> None:
        self.stdout = stdout
        self.commands: list[str] = []

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        self.commands.append(command)
        return Result(command, 0, self.stdout, "")


def test_kernel_symbols_are_read_once_and_stored_by_content(tmp_path):
    armoured = base64.b64encode(gzip.compress(KALLSYMS.encode())).decode()
    shell = FakeShell(armoured)
    ref = cw.record_kernel_symbols(shell, tmp_path)
    assert "/proc/kallsyms" in shell.commands[0]
    stored = tmp_path / ref["kernel"]
    assert symfmt.decompress_table(stored.read_bytes(), "x") == KALLSYMS
    assert ref["kernel_symbols"] == 4
    assert cw.record_kernel_symbols(shell, tmp_path) == ref
    with pytest.raises(NetbedError):
        cw.record_kernel_symbols(FakeShell("!!not base64!!"), tmp_path)


@pytest.mark.parametrize(("text", "match"), [
    ("window,pc\n1,0x1\n", "columns"),
    (HEAD + "\n1,0xzz,0,kernel,cpu,1,1,1,1,1,1,1,1\n", "does not parse"),
    (HEAD + "\n1,0x10,0,kernel,cpu,1,x,1,1,1,1,1,1\n", "does not parse"),
    (HEAD + "\n1,0x10,0,kernel,disk,1,1,1,1,1,1,1,1\n", "unknown mode/data"),
])
def test_damaged_sites_tables_are_refused_with_their_name(text, match):
    with pytest.raises(NetbedError, match=match):
        cmfmt.read_sites(text, "rep-0/cachemodel-sites.csv")


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.process
def test_report_writes_the_same_files_with_attribution_beside(tmp_path, monkeypatch):
    """write_report's attribution in a process of its own (analysis/beside.py) gives
    byte for byte the files of the same report written in one process."""
    from analysis import beside, pipeline

    monkeypatch.setattr(beside.os, "cpu_count", lambda: 2)
    run = make_run(tmp_path)
    out = run / "analysis"
    monkeypatch.setattr(pipeline, "BESIDE_MIN_REPS", 10**6)
    pipeline.write_report(run)
    alone = _outputs(out)
    assert "symbols.csv" in alone and "report.html" in alone
    for p in sorted(out.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    monkeypatch.setattr(pipeline, "BESIDE_MIN_REPS", 1)
    pipeline.write_report(run)
    assert _outputs(out) == alone
    for f in (run / symfmt.SYMBOLS_DIR).iterdir():  # its error reaches the caller
        f.unlink()
    with pytest.raises(NetbedError, match="which is missing"):
        pipeline.write_report(run)
