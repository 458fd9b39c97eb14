"""testbed.run.session: the fault-injection hook of the real collaborators."""

from __future__ import annotations

import pytest

from testbed.errors import NetbedError
from testbed.run.session import Fault


@pytest.mark.parametrize("text", ["crash:x", "hang:", "hang", "x"])
def test_bad_fault_specs_are_rejected(text):
    with pytest.raises(NetbedError, match="KIND:<cell-id>"):
        Fault.parse(text)


def test_fault_spec_parses():
    assert Fault.parse("hang:cell-a") == Fault("cell-a", "hang")
    assert Fault.parse(None) is None


def test_the_counter_plan_decides_plugin_and_accelerator(tmp_path):
    from pathlib import Path

    from testbed.experiment.load import loads_experiment
    from testbed.run.folder import RunDir
    from testbed.run.provenance import Provenance
    from testbed.run.session import ExperimentGuests
    from testbed.settings import Settings
    from tests.unit.test_provenance import facts

    exp = loads_experiment("name: s\ncounters: [cachemodel]\n", Path("s.yaml"))
    prov = Provenance(RunDir(tmp_path), exp.counters, log=lambda m: None)
    guests = ExperimentGuests(Settings(), RunDir(tmp_path), exp, prov, log=lambda m: None)
    prov.decide(facts(accel="kvm", pmu=True))
    assert guests.cachemodel and guests.accel == "tcg"  # the plugin needs TCG
    auto = loads_experiment("name: a\n", Path("a.yaml"))
    prov = Provenance(RunDir(tmp_path), auto.counters, log=lambda m: None)
    guests = ExperimentGuests(Settings(), RunDir(tmp_path), auto, prov, log=lambda m: None)
    prov.decide(facts(accel="tcg", pmu=False))
    assert guests.cachemodel and guests.accel is None  # auto under TCG: the cache model
    prov.decide(facts(accel="kvm", pmu=True))
    assert not guests.cachemodel and guests.accel is None


def _guests(tmp_path, text: str, accel: str):
    from pathlib import Path

    from testbed.experiment.load import loads_experiment
    from testbed.run.folder import RunDir
    from testbed.run.provenance import Provenance
    from testbed.run.session import ExperimentGuests
    from testbed.settings import Settings
    from tests.unit.test_provenance import facts

    exp = loads_experiment(text, Path("p.yaml"))
    prov = Provenance(RunDir(tmp_path), exp.counters, log=lambda m: None)
    prov.decide(facts(accel=accel, pmu=accel == "kvm"))
    return ExperimentGuests(Settings(), RunDir(tmp_path), exp, prov, log=lambda m: None)


def test_plain_repetitions_follow_the_instrumented_ones_only_under_the_cache_model(tmp_path):
    tcg = _guests(tmp_path, "name: p\nrepetitions: 3\nplain_repetitions: 2\n", "tcg")
    assert tcg.plain_repetitions == 2
    assert [tcg.is_plain(r) for r in range(6)] == [False] * 3 + [True] * 3
    assert tcg.collaborators(start=lambda: None).plain(3)
    kvm = _guests(tmp_path, "name: p\nrepetitions: 3\nplain_repetitions: 2\n", "kvm")
    assert kvm.plain_repetitions == 0 and not kvm.is_plain(4)  # no plugin: nothing to add
    adaptive = _guests(tmp_path, "name: p\nrepetitions: {min: 5, max: 8}\n", "tcg")
    assert not adaptive.is_plain(7) and adaptive.is_plain(8)  # after every adaptive round


def test_a_plain_boot_measures_without_the_plugin_and_says_so(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from testbed.experiment.matrix import expand
    from testbed.run import session
    from testbed.run.folder import RunDir

    guests = _guests(tmp_path, "name: p\n", "tcg")
    calls: list[dict[str, object]] = []
    collected: list[object] = []
    monkeypatch.setattr(session, "run_repetition",
                        lambda *a, **k: calls.append(k) or {"throughput": 1.0})
    monkeypatch.setattr(session, "collect_window", lambda *a: collected.append(a))
    node = SimpleNamespace(ssh=object(), spec=SimpleNamespace(workdir=tmp_path))
    topo = SimpleNamespace(receiver=node, sender=node, sender_shell=node.ssh)
    rep = RunDir(tmp_path).start_rep("c", 0)
    cell = expand(guests.exp)[0]
    plain = guests.measure(session.Booted(topo, None, None, plugin=False), cell, rep)
    assert plain == {"throughput": 1.0, "plugin": False}
    assert calls[-1]["cachemodel"] is False and collected == []  # no markers
    assert calls[-1]["tracing"] is True
    inst = guests.measure(session.Booted(topo, None, {}, plugin=True), cell, rep)
    assert inst["plugin"] is True and calls[-1]["cachemodel"] is True and len(collected) == 1
    assert calls[-1]["tracing"] is False  # the tracer's accesses would be counted


def test_tracing_off_in_the_config_reaches_every_window(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from testbed.experiment.matrix import expand
    from testbed.run import session
    from testbed.run.folder import RunDir

    guests = _guests(tmp_path, "name: p\ntracing: off\n", "tcg")
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(session, "run_repetition",
                        lambda *a, **k: calls.append(k) or {"throughput": 1.0})
    node = SimpleNamespace(ssh=object(), spec=SimpleNamespace(workdir=tmp_path))
    topo = SimpleNamespace(receiver=node, sender=node, sender_shell=node.ssh)
    guests.measure(session.Booted(topo, None, None, plugin=False),
                   expand(guests.exp)[0], RunDir(tmp_path).start_rep("c", 0))
    assert calls[-1]["tracing"] is False


def test_the_fault_kinds_parse():
    assert Fault.parse("kill-qemu:c") == Fault("c", "kill-qemu")
    assert Fault.parse("kill-netserver:c") == Fault("c", "kill-netserver")


def test_a_qemu_exit_status_in_words():
    from testbed.run.session import exit_text

    assert exit_text(-9).startswith("killed by SIGKILL (from outside netbed")
    assert exit_text(-15) == "killed by SIGTERM"
    assert exit_text(1) == "exited with status 1"


def test_the_strike_comes_once_netperf_has_started_on_the_sender():
    import threading

    from testbed.run.session import _StrikeMidWindow
    from testbed.run.traffic import start_command
    from testbed.shell import Result

    class Sender:
        def run(self, command, timeout=None, check=True):
            return Result(command, 0, "", "")

    struck = threading.Event()
    shell = _StrikeMidWindow(Sender(), 0.0, struck.set)
    shell.run("true")
    assert shell.timer is None  # nothing before netperf starts
    shell.run(start_command("netperf -H 198.18.0.1"))
    assert shell.timer is not None and struck.wait(10)
