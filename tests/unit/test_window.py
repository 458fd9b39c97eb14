"""The measured-window script (testbed.run.window): order of reads, tracing, stamps."""

from __future__ import annotations

from testbed.experiment.config import experiment_from_dict
from testbed.experiment.policies import load_policies
from testbed.run.window import window_script


def experiment(**over):
    data = {"name": "t", "axes": {"kernel": ["distro"], "nic": ["e1000"], "cpus": [2],
                                  "policy": ["default"], "workload": ["TCP_STREAM"],
                                  "gro": ["on"]},
            "repetitions": 1, "duration": 3, "warmup": 0, **over}
    return experiment_from_dict(data, load_policies())


def inner(script: str) -> str:
    return script.split("<<'NETBED_INNER'\n", 1)[1].split("\nNETBED_INNER", 1)[0]


def test_window_waits_for_the_reader_then_runs_perf_over_the_inner_window():
    script = window_script(experiment(), pmu=False, cachemodel=False, iface="eth1")
    # the trace is armed before the wait (its sched filters name netserver, not a pid)
    order = [script.index(s) for s in ("events/net/netif_receive_skb", "old=", "until ",
                                       "reader-pid.txt", "perf stat", "trace.txt.gz",
                                       "finished")]
    assert order == sorted(order)
    assert "-- sh /tmp/netbed/inner.sh" in script  # perf counts exactly the inner window
    assert "cycles" not in script  # no hardware events without a PMU
    assert "nbmark" not in script


def test_inner_window_nests_every_source_inside_perf_through_nbsnap():
    text = inner(window_script(experiment(), pmu=True, cachemodel=False, iface="eth1"))
    steps = ["snap stamp perf-begin", "snap units before", "snap proc before",
             "snap trace on", "sleep 3", "snap trace off", "snap proc after",
             "snap units after", "snap stamp perf-end", "echo quit"]
    pos = [text.index(s) for s in steps]
    assert pos == sorted(pos)
    assert "mark" not in text
    # no fork between the edges and the sleep: only builtins and nbsnap's FIFO
    edge = text[text.index("snap stamp perf-begin"):text.index("( if command -v nbsample")]
    assert all(ln.startswith(("snap ", "[ -e ")) for ln in edge.splitlines())


def test_nbsnap_is_started_before_perf_on_the_data_nic():
    script = window_script(experiment(), pmu=False, cachemodel=False, iface="eth1")
    assert script.index("mkfifo") < script.index("nbsnap /tmp/netbed/win eth1") < \
        script.index("perf stat")


def test_cache_model_marks_enclose_the_units_and_tracing_stays_out():
    script = window_script(experiment(), pmu=True, cachemodel=True, iface="eth1")
    text = inner(script)
    assert "cycles" in script and "LLC-load-misses" in script
    assert (text.index("snap mark begin") < text.index("snap units before")
            < text.index("snap units after") < text.index("snap mark end")
            < text.index("snap stamp perf-end"))
    assert "trace on" not in text and "events/net" not in script
    assert "kept out of cache-model windows" in script  # the reason, as a raw file


def test_trace_filters_name_the_nic_and_the_readers_command():
    script = window_script(experiment(), pmu=False, cachemodel=False, iface="enp0s3")
    assert "echo 'name == \"enp0s3\"' > /sys/kernel/tracing/events/net/netif_receive_skb/filter" \
        in script
    assert "echo 'prev_comm == \"netserver\" || next_comm == \"netserver\"' >" in script
    assert 'nbsnap /tmp/netbed/win enp0s3 "$pid"' in script
    assert "echo mono > /sys/kernel/tracing/trace_clock" in script


def test_without_an_interface_there_is_no_trace_and_the_reason_is_kept():
    script = window_script(experiment(), pmu=False, cachemodel=False)
    assert "events/net" not in script and "trace-unsupported" in script
    assert "snap trace" not in script


def test_reader_affinity_goes_to_its_file_whichever_branch_runs():
    script = window_script(experiment(), pmu=False, cachemodel=False, iface="eth1")
    line = next(ln for ln in script.splitlines() if "reader-affinity.txt" in ln)
    assert line.startswith("{ ") and "; } > /tmp/netbed/win/reader-affinity.txt" in line
