"""testbed/formats/payloadpath.py (parser, tidy rows, pass ranges) and the runner's side:
the passes file written from kallsyms, the window's CSV copied into the repetition."""

from __future__ import annotations

import base64
import gzip
import math

import pandas as pd
import pytest

from analysis.collate import collate_rep
from testbed.errors import NetbedError
from testbed.formats import cachemodel as cmfmt
from testbed.formats import payloadpath as pp
from testbed.formats.symbols import parse_kallsyms
from testbed.run import cachemodel_window as cw
from testbed.run.folder import RunDir
from tests.unit.test_cachemodel_analysis import FakeShell, c2c_csv, sites_csv, snapshot_blocks

KALLSYMS = ("ffffffff81000000 T _text\n"
            "ffffffff81000100 T csum_partial\n"
            "ffffffff81000200 T csum_partial_copy_generic\n"
            "ffffffff81000300 T copy_user_enhanced_fast_string\n"
            "ffffffff81000400 T _copy_to_iter\n"
            "ffffffff81000500 T tcp_recvmsg\n"
            "ffffffffc0000000 t e1000_clean_rx_irq\t[e1000]\n")


def csv(window: int = 2, copy: dict[tuple[str, str], int] | None = None,
        lag: dict[tuple[str, int], int] | None = None, ranges: int = 4, unknown: int = 0) -> str:
    rows = ["window,kind,name,detail,count"]
    rows += [f"{window},first_read,{p},,{n}" for p, n in (("other", 3), ("checksum", 90),
                                                           ("copy", 7))]
    copy = copy or {}
    rows += [f"{window},copy_from,{s},{r},{copy.get((s, r), 0)}" for r in pp.RELATIONS
             for s in pp.SERVED]
    rows += [f"{window},lag_kb,{f},{kb},{n}" for (f, kb), n in (lag or {}).items()]
    counters = {"noticed": 100, "lag_unknown": unknown, "pass_ranges": ranges}
    rows += [f"{window},records,{c},,{counters.get(c, 0)}" for c in pp.COUNTERS]
    return "\n".join(rows) + "\n"


def test_pass_ranges_come_from_the_kernels_function_names():
    table = parse_kallsyms(KALLSYMS)
    got = pp.pass_ranges(table)
    assert [(hex(s), p) for s, _, p in got] == [
        ("0xffffffff81000100", "checksum"), ("0xffffffff81000200", "copy"),
        ("0xffffffff81000300", "copy"), ("0xffffffff81000400", "copy")]
    text = pp.format_passes(got)
    assert text.startswith("#") and "ffffffff81000100 ffffffff81000200 checksum\n" in text
    assert pp.pass_of("copy_user_generic_unrolled") == "copy"
    assert pp.pass_of("csum_partial [foo]") == "checksum"
    assert pp.pass_of("csum_ipv6_magic") is None


def test_shares_sum_to_one_and_peer_joins_clean_and_modified():
    text = csv(copy={("own", "same_cpu"): 60, ("peer_clean", "other_cpu"): 20,
                     ("peer_modified", "other_cpu"): 5, ("llc", "no_checksum"): 10,
                     ("memory", "same_cpu"): 5},
               lag={("checksum", 0): 50, ("checksum", 3): 30, ("checksum", 700): 10})
    rows = {r.metric: r for r in pp.tidy_rows(pp.parse(text))}
    shares = {k: rows[f"cache.payload_copy_from.{k}"].value
              for k in ("own", "peer", "llc", "memory")}
    assert shares == pytest.approx({"own": 0.6, "peer": 0.25, "llc": 0.1, "memory": 0.05})
    assert math.isclose(sum(shares.values()), 1.0)
    assert "modified 5" in rows["cache.payload_copy_from.peer"].note
    assert rows["cache.payload_lag_kb.p50"].value == 0
    assert rows["cache.payload_lag_kb.p95"].value == 700
    assert "n=90" in rows["cache.payload_lag_kb.p50"].note
    # 65 copies with a checksum on the same CPU, 25 on another, 10 without one
    assert rows["cache.payload_checksum_cpu_is_copy_cpu"].value == pytest.approx(65 / 90)
    assert rows["cache.payload_copy_reads"].value == 100


def test_an_offloading_nic_gets_its_lag_from_the_first_read_or_none():
    text = csv(copy={("llc", "no_checksum"): 10}, lag={("first_read", 4): 6}, unknown=4)
    rows = {r.metric: r for r in pp.tidy_rows(pp.parse(text))}
    assert rows["cache.payload_lag_kb.p50"].value == 4
    assert "first read" in rows["cache.payload_lag_kb.p50"].note
    assert rows["cache.payload_checksum_cpu_is_copy_cpu"].status == "not-supported"
    for lag in ({}, {("first_read", 4): 2}):  # none, or a few header lines against many
        rows = {r.metric: r for r in pp.tidy_rows(pp.parse(csv(
            copy={("llc", "no_checksum"): 10}, lag=lag, unknown=8)))}
        assert rows["cache.payload_lag_kb.p95"].status == "not-supported"
        assert math.isnan(rows["cache.payload_lag_kb.p95"].value)


def test_no_copy_reads_and_no_pass_ranges_are_not_supported_never_zero():
    for text in (csv(), csv(ranges=0)):
        rows = pp.tidy_rows(pp.parse(text))
        shares = [r for r in rows if r.metric.startswith("cache.payload_copy_from.")]
        assert len(shares) == 4 and all(r.status == "not-supported" for r in shares)
        assert all(math.isnan(r.value) for r in shares)


@pytest.mark.parametrize(("text", "match"), [
    ("window,kind\n1,x\n", "columns"),
    (csv(1) + csv(2).split("\n", 1)[1], "windows"),
    (csv().replace("records,noticed", "records,bogus"), r":\d+: unknown row"),
    (csv().replace("own,same_cpu", "own,sideways"), "relation"),
    ("", "does not parse"),
])
def test_damaged_files_are_refused_with_their_name(text, match):
    with pytest.raises(NetbedError, match=match):
        pp.parse(text, "rep-1/cachemodel-payload.csv")


def test_quantile_of_a_histogram():
    assert pp.quantile({1: 1, 2: 1, 3: 2}, 0.5) == 2
    assert pp.quantile({1: 1, 2: 1, 3: 2}, 0.95) == 3
    assert math.isnan(pp.quantile({}, 0.5))


# ---------------------------------------------------------------- runner and collate
def test_the_passes_file_is_written_with_the_kernel_symbols(tmp_path):
    armoured = base64.b64encode(gzip.compress(KALLSYMS.encode())).decode()
    work = tmp_path / "work"
    work.mkdir()
    cw.record_kernel_symbols(FakeShell(armoured), tmp_path / "run", work)
    text = (work / pp.PASSES_FILE).read_text()
    assert text.count("copy\n") == 3 and text.count("checksum\n") == 1


def test_the_windows_payload_file_is_copied_and_collated(tmp_path):
    work, run = tmp_path / "work", RunDir(tmp_path / "run")
    work.mkdir()
    (work / cw.CSV_NAME).write_text(snapshot_blocks(["begin:0", "end:0", "begin:1", "end:1"]))
    (work / cmfmt.SITES_FILE).write_text(sites_csv(2, 5))
    (work / cmfmt.C2C_FILE).write_text(c2c_csv(2))
    (work / pp.RAW).write_text(csv(1))  # the throw-away window's
    with pytest.raises(NetbedError, match="holds window 1, the measured one is 2"):
        cw.collect_window(work, run.start_rep("c", 0))
    (work / pp.RAW).write_text(csv(2, copy={("own", "same_cpu"): 3, ("llc", "other_cpu"): 1}))
    rep = run.start_rep("c", 1)
    cw.collect_window(work, rep)
    assert rep.file(pp.RAW).read_text() == (work / pp.RAW).read_text()
    run.mark_done(rep, {})
    df = pd.DataFrame(collate_rep(rep)[0]).set_index("metric")
    assert df.loc["cache.payload_copy_from.own", "value"] == 0.75
    assert df.loc["cache.payload_copy_from.own", "source"] == "cachemodel"
    assert df.loc["cache.payload_copy_from.memory", "value"] == 0
    (rep.path / pp.RAW).write_text("garbage\n")
    run.mark_done(rep, {})  # as written (done lists each file's size: a later change is damage)
    df = pd.DataFrame(collate_rep(rep)[0]).set_index("metric")
    assert df.loc["cache.payload_copy_from", "status"] == "error"
