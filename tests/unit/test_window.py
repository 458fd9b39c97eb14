"""The measured-window script (testbed.run.window): order of reads, tracing, stamps."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from testbed.experiment.load import experiment_from_dict
from testbed.experiment.policies import load_policies
from testbed.run.window import ARM_SETTLE_S, window_problems, window_script


def experiment(**over):
    data = {"name": "t", "axes": {"kernel": ["distro"], "nic": ["e1000"], "cpus": [2],
                                  "policy": ["default"], "workload": ["TCP_STREAM"],
                                  "gro": ["on"]},
            "repetitions": 1, "duration": 3, "warmup": 0, **over}
    return experiment_from_dict(data, load_policies())


def inner(script: str) -> str:
    return script.split("<<'NETBED_INNER'\n", 1)[1].split("\nNETBED_INNER", 1)[0]


def test_perf_starts_disabled_before_netperf_and_the_inner_script_waits_for_the_reader():
    script = window_script(experiment(), pmu=False, cachemodel=False, iface="eth1")
    # the trace is armed before the wait (its sched filters name netserver, not a pid);
    # perf starts (slowly, in a slow guest) before `armed` lets netperf start
    order = [script.index(s) for s in ("events/net/netif_receive_skb", "old=", "until ",
                                       "reader-pid.txt", "perf stat", "/win/armed",
                                       "wait $window_job", "trace.txt.gz", "finished")]
    assert order == sorted(order)
    assert "-D -1 --control fifo:/tmp/netbed/perf.ctl,/tmp/netbed/perf.ack" in script
    assert "-- sh /tmp/netbed/inner.sh" in script  # perf counts only inside the inner window
    assert "cycles" not in script  # no hardware events without a PMU
    assert "nbmark" not in script


def test_inner_window_nests_every_source_inside_perf_through_nbsnap():
    text = inner(window_script(experiment(), pmu=True, cachemodel=False, iface="eth1"))
    lines = text.splitlines()
    begin = lines.index('snap "perf enable; units before${t}; proc before"')
    end = lines.index('snap "proc after; ${t}units after; perf disable"')
    # perf's counting is switched by nbsnap in the edge's own line (stamped around it),
    # right against the units' reads; nbsnap has perf's FIFOs before the window
    assert lines.index('snap "perfctl /tmp/netbed/perf.ctl /tmp/netbed/perf.ack $PPID"') \
        < begin  # $PPID: perf stat runs this script, and nbsnap makes it SCHED_FIFO
    assert "t='; trace on'" in text and "t='trace off; '" in text
    assert begin < lines.index("sleep 3") < end
    assert "mark" not in text
    # from the reader's pid to the opened window: no fork, only builtins and FIFO round trips
    for ln in lines[lines.index("pid=$r"):begin + 1]:
        assert not any(w in ln for w in ("pgrep", "sed ", "cat ", "mkfifo", "$(")), ln


def test_nbsnap_is_started_before_perf_on_the_data_nic():
    script = window_script(experiment(), pmu=False, cachemodel=False, iface="eth1")
    assert script.index("mkfifo") < script.index("nbsnap /tmp/netbed/win eth1") < \
        script.index("perf stat")


def test_cache_model_marks_enclose_the_units_and_tracing_and_perf_stay_out():
    script = window_script(experiment(), pmu=True, cachemodel=True, iface="eth1")
    text = inner(script)
    # the markers sit right against the units (reads inside a region are slow), in the
    # same nbsnap line; perf's edges lagged by up to 246 ms there, so perf is out
    assert 'snap "mark begin; units before; proc before"' in text
    assert 'snap "proc after; units after; mark end"' in text
    assert "perf stat" not in script and "perfctl" not in text and "cycles" not in script
    assert "timeout -k 5 94 sh /tmp/netbed/inner.sh" in script  # 3 + ceil(30 + 60 + 0.5)
    assert "trace on" not in text and "events/net" not in script
    # the reasons, as raw files analysis turns into not-supported rows
    assert "> /tmp/netbed/win/trace-unsupported" in script
    assert "perf is kept out of cache-model windows" in script
    assert "> /tmp/netbed/win/perf-unsupported" in script
    assert script.index("perf-unsupported") < script.index("/win/armed")


def test_model_windows_arm_the_plugin_after_the_warm_up_and_before_begin():
    """The cache model is armed (QEMU retranslates with its callbacks) ahead of the
    window, so `begin` only starts counting; plain windows have no marker at all."""
    text = inner(window_script(experiment(warmup=1), pmu=False, cachemodel=True,
                               iface="eth1"))
    lines = text.splitlines()
    arm = lines.index(f'snap "mark arm"; sleep {ARM_SETTLE_S:g}')
    assert lines.index("sleep 1") < arm  # after the warm-up
    # before the reader's reads are warmed (their code is then translated armed) and
    # before the begin line
    assert arm < lines.index('echo "reader $pid" >&3; read -r ack <&4')
    assert arm < lines.index('snap "mark begin; units before; proc before"')
    assert text.count("mark arm") == 1
    for plain in (window_script(experiment(warmup=1), pmu=pmu, cachemodel=False, iface=iface)
                  for pmu in (False, True) for iface in (None, "eth1")):
        assert "mark arm" not in plain and "mark " not in inner(plain)


def test_a_model_window_without_perf_is_not_a_problem_but_a_missing_perf_file_is(tmp_path):
    for name in ("stamps.txt", "tcpinfo-before.txt", "tcpinfo-after.txt"):
        (tmp_path / name).write_text("x\n")
    assert window_problems(tmp_path) == ["no perf-stat.csv"]
    (tmp_path / "perf-unsupported").write_text("perf is kept out\n")
    assert window_problems(tmp_path) == []


def test_trace_filters_name_the_nic_and_the_readers_command():
    script = window_script(experiment(), pmu=False, cachemodel=False, iface="enp0s3")
    assert "echo 'name == \"enp0s3\"' > /sys/kernel/tracing/events/net/netif_receive_skb/filter" \
        in script
    assert "echo 'prev_comm == \"netserver\" || next_comm == \"netserver\"' >" in script
    assert "nbsnap /tmp/netbed/win enp0s3 0 <" in script
    # the reader's pid reaches nbsnap over its FIFO: no fork once the reader exists
    text = inner(script)
    after = text[text.index("pid=$r"):text.index("perf enable")]
    assert 'echo "reader $pid" >&3' in after
    assert not any(w in after for w in ("pgrep", "sed ", "cat ", "mkfifo", "$("))
    assert "echo mono > /sys/kernel/tracing/trace_clock" in script


def test_without_an_interface_there_is_no_trace_and_the_reason_is_kept():
    script = window_script(experiment(), pmu=False, cachemodel=False)
    assert "events/net" not in script and "trace-unsupported" in script
    assert "snap trace" not in script


def test_reader_affinity_goes_to_its_file_whichever_branch_runs():
    script = window_script(experiment(), pmu=False, cachemodel=False, iface="eth1")
    line = next(ln for ln in script.splitlines() if "reader-affinity.txt" in ln)
    assert line.startswith("{ ") and "; } > /tmp/netbed/win/reader-affinity.txt" in line
    assert "Cpus_allowed_list:" in line and "/proc/$pid/status" in line


def test_window_problems_name_nbsnap_errors_and_missing_reads(tmp_path):
    from testbed.run.window import window_problems

    for name in ("stamps.txt", "tcpinfo-before.txt", "tcpinfo-after.txt", "perf-stat.csv"):
        (tmp_path / name).write_text("x\n")
    assert window_problems(tmp_path) == []
    (tmp_path / "trace-unsupported").write_text("kernel has no tracepoint napi/napi_poll\n")
    assert window_problems(tmp_path) == []  # not-supported rows later, not a failure
    (tmp_path / "nbsnap-errors.txt").write_text("units after -> error units after: EIO\n")
    (tmp_path / "tcpinfo-after.txt").unlink()
    got = window_problems(tmp_path)
    assert got == ["nbsnap: units after -> error units after: EIO", "no tcpinfo-after.txt"]


@pytest.mark.process
@pytest.mark.skipif(shutil.which("dash") is None, reason="needs dash (the guest's /bin/sh)")
@pytest.mark.parametrize("pmu", [False, True])
@pytest.mark.parametrize("cachemodel", [False, True])
@pytest.mark.parametrize("iface", [None, "eth1"])
@pytest.mark.parametrize("tracing", [None, False, True])
def test_every_variant_of_the_window_script_is_valid_shell(tmp_path, pmu, cachemodel, iface,
                                                           tracing):
    script = window_script(experiment(), pmu=pmu, cachemodel=cachemodel, iface=iface,
                           tracing=tracing)
    (tmp_path / "w.sh").write_text(script)
    (tmp_path / "inner.sh").write_text(inner(script))
    for name in ("w.sh", "inner.sh"):
        res = subprocess.run(["dash", "-n", str(tmp_path / name)], capture_output=True,
                             text=True)
        assert res.returncode == 0, (name, res.stderr)


@pytest.mark.parametrize(("warmup", "lead"), [(0, "sleep 0.5\n"), (2, "sleep 2\n")])
def test_the_warmup_is_the_measured_connections_traffic_before_the_window_opens(warmup, lead):
    # no second netperf: the window waits for the reader, then lets it run `warmup` s
    # (at least the connection's ramp) before perf and the first edge read
    script = window_script(experiment(warmup=warmup), pmu=False, cachemodel=False,
                           iface="eth1")
    text = inner(script)
    assert text.index("pid=$r") < text.index(lead) < text.index("perf enable")
