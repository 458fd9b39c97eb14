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
    console = tmp_path / "receiver.console.log"
    node = SimpleNamespace(ssh=object(), spec=SimpleNamespace(workdir=tmp_path,
                                                              console_log=console))
    topo = SimpleNamespace(receiver=node, sender=node, sender_shell=node.ssh)
    rep = RunDir(tmp_path).start_rep("c", 0)
    cell = expand(guests.exp)[0]
    plain = guests.measure(session.Booted(topo, None, None, plugin=False), cell, rep)
    assert plain == {"throughput": 1.0, "plugin": False}
    assert calls[-1]["cachemodel"] is False and collected == []  # no markers
    assert calls[-1]["tracing"] is True
    assert calls[-1]["console"] == console  # where the window's close is seen
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
    node = SimpleNamespace(ssh=object(), spec=SimpleNamespace(
        workdir=tmp_path, console_log=tmp_path / "receiver.console.log"))
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


class _Receiver:
    """A receiver shell that acts as the guest would for the strike: when the strike
    watcher is started, it writes the mark to the console file (opened 0.1 s after the
    window began, struck one second later)."""

    def __init__(self, console, mark=True):
        self.console = console
        self.mark = mark
        self.commands: list[str] = []

    def run(self, command, timeout=None, check=True):
        from testbed.run.session import STRIKE_MARK
        from testbed.shell import Result

        self.commands.append(command)
        if self.mark and STRIKE_MARK in command:
            with self.console.open("a") as f:
                f.write(f"boot noise\n{STRIKE_MARK} opened=100.10 struck=101.10\n")
        return Result(command, 0, "", "")


def test_the_strike_waits_for_the_windows_own_begin_then_half_the_window():
    from testbed.formats import reader
    from testbed.run.session import STRIKE_MARK, strike_command

    net = strike_command("kill-netserver", 4, win="/w")
    # the reader's pid first (written before the window), then the sampler's file,
    # which the window script creates right after its `units before` edge
    assert net.index(reader.RAW_PID) < net.index(f"/w/{reader.RAW} ]")
    assert net.index(f"/w/{reader.RAW} ]") < net.index("read -r -t 2 -u 9") \
        < net.index('kill -9 "$r" "$d"') < net.index(STRIKE_MARK)
    # nothing forks while it waits: no sleep, no pkill; at a real-time priority
    assert "sleep" not in net and "pkill" not in net and "chrt -f" in net
    qemu = strike_command("kill-qemu", 2)
    assert "read -r -t 1 -u 9" in qemu and "kill" not in qemu
    assert "> /dev/console" in qemu


def test_a_mark_gives_the_seconds_from_the_windows_opening_to_the_strike():
    from testbed.run.session import STRIKE_MARK, parse_mark

    assert parse_mark(f"{STRIKE_MARK} opened=100.10 struck=101.15") == pytest.approx(1.05)
    assert parse_mark(f"{STRIKE_MARK} opened= struck=") is None
    assert parse_mark("garbage") is None


def test_the_console_watch_sees_only_a_mark_written_after_its_offset(tmp_path):
    from testbed.run.session import STRIKE_MARK, watch_console

    console = tmp_path / "console.log"
    console.write_text(f"{STRIKE_MARK} opened=1 struck=2\n")  # an earlier attempt's
    offset = console.stat().st_size
    looks: list[int] = []

    def stopped() -> bool:
        looks.append(1)
        if len(looks) == 3:
            with console.open("a") as f:
                f.write(f"noise\n{STRIKE_MARK} opened=5 struck=6\n")
        return False

    assert watch_console(console, offset, stopped, sleep=lambda s: None) == \
        f"{STRIKE_MARK} opened=5 struck=6"
    assert len(looks) == 3
    # stopped, and none came: None after one last look
    assert watch_console(console, console.stat().st_size, lambda: True,
                         sleep=lambda s: None) is None
    assert watch_console(tmp_path / "absent.log", 0, lambda: True) is None


def test_the_strike_starts_right_after_the_window_is_armed_and_acts_on_its_mark(tmp_path):
    import threading

    from testbed.run.repetition import start_window_command
    from testbed.run.session import StrikeInWindow, strike_command

    console = tmp_path / "console.log"
    rx = _Receiver(console)
    seen: list[str] = []
    marked = threading.Event()
    shell = StrikeInWindow(rx, strike_command("kill-qemu", 2), console,
                           lambda line: (seen.append(line), marked.set()))
    shell.run("echo policy")
    assert shell.thread is None and len(rx.commands) == 1  # nothing before the window
    shell.run(start_window_command("echo window\n"))
    assert rx.commands[-1] == strike_command("kill-qemu", 2)
    assert marked.wait(30)
    shell.run(start_window_command("echo window\n"))  # one strike per shell
    assert len(rx.commands) == 4
    shell.stop()
    assert seen == ["netbed-fault-struck opened=100.10 struck=101.10"]


@pytest.mark.process
def test_the_strike_script_kills_the_reader_and_its_daemon_mid_window(tmp_path):
    """The guest half run by the host's /bin/sh and bash (as in the guest image): a
    `daemon` shell whose child `sleep` stands in for the reader."""
    import subprocess
    import time
    from pathlib import Path

    from testbed.formats import reader
    from testbed.run.session import STRIKE_MARK, parse_mark, strike_command

    win, console = tmp_path / "win", tmp_path / "console"
    win.mkdir()
    daemon = subprocess.Popen(["sh", "-c", "sleep 300 & echo $! > child; wait"],
                              cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "child").is_file() or not (tmp_path / "child").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = int((tmp_path / "child").read_text())
        (win / reader.RAW_PID).write_text(f"{child}\n")
        script = strike_command("kill-netserver", 1, win=str(win), console=str(console))
        # as the guest runs it (chrt, where the host allows SCHED_FIFO, else without)
        subprocess.run(["sh", "-c", script], check=True, timeout=30)
        time.sleep(1.5)  # three half-windows: a strike not waiting for the opening came
        assert daemon.poll() is None  # the window has not opened: no strike yet
        (win / reader.RAW).write_text("")  # the window opens
        assert daemon.wait(timeout=30) == -9  # the daemon, SIGKILLed
        deadline = time.monotonic() + 30
        while STRIKE_MARK not in (console.read_text() if console.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        into = parse_mark(console.read_text())
        assert into is not None and into >= 0.5  # half the window after the opening
        state = Path(f"/proc/{child}/stat")
        # gone, or a zombie waiting for init to reap it (its parent was killed)
        alive = state.exists() and state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        assert not alive  # the reader too
    finally:
        if daemon.poll() is None:
            daemon.kill()


def _faulty_guests(tmp_path, kind: str):
    from testbed.run.session import Fault

    guests = _guests(tmp_path, "name: p\nduration: 2\ncounters: [software]\n", "tcg")
    guests.fault = Fault(kind=kind, cell_id="")
    logged: list[str] = []
    guests.log = logged.append
    return guests, logged


def _topo(tmp_path, rx, popen):
    from types import SimpleNamespace

    console = tmp_path / "console-receiver.log"
    node = SimpleNamespace(ssh=rx, spec=SimpleNamespace(workdir=tmp_path, console_log=console),
                           process=SimpleNamespace(popen=popen))
    return SimpleNamespace(receiver=node, sender=node, sender_shell=object())


def test_kill_qemu_sigkills_the_receiver_on_the_mark_and_names_its_death(tmp_path,
                                                                        monkeypatch):
    from types import SimpleNamespace

    from testbed.errors import GuestError
    from testbed.experiment.matrix import expand
    from testbed.run import session
    from testbed.run.folder import RunDir
    from testbed.run.repetition import start_window_command

    guests, logged = _faulty_guests(tmp_path, "kill-qemu")
    cell = expand(guests.exp)[0]
    guests.fault = session.Fault(cell.cell_id, "kill-qemu")
    popen = SimpleNamespace(pid=4242, status=None)
    popen.poll = lambda: popen.status
    killed: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        killed.append((pid, sig))
        popen.status = -sig

    monkeypatch.setattr(session.os, "kill", kill)
    topo = _topo(tmp_path, _Receiver(tmp_path / "console-receiver.log"), popen)

    def repetition(rx, *a, **k):
        rx.run(start_window_command("echo window\n"))
        deadline = __import__("time").monotonic() + 30
        while popen.status is None:  # the window runs until QEMU is killed
            assert __import__("time").monotonic() < deadline
            __import__("time").sleep(0.01)
        raise GuestError("guest receiver: SSH dropped while running 'x'")

    monkeypatch.setattr(session, "run_repetition", repetition)
    booted = session.Booted(topo, None, None, plugin=False)
    with pytest.raises(GuestError, match=r"QEMU died during the repetition \(killed by "
                                         r"SIGKILL"):
        guests.measure(booted, cell, RunDir(tmp_path).start_rep(cell.cell_id, 0))
    assert killed == [(4242, 9)]
    assert any("SIGKILL to the receiver's QEMU (pid 4242) mid-window" in m
               and "1.00 s after the window opened (window 2 s" in m for m in logged)
    # the retry (a fresh boot) measures on the receiver's own shell: no second strike
    popen.status = None
    seen: list[object] = []
    monkeypatch.setattr(session, "run_repetition",
                        lambda rx, *a, **k: seen.append(rx) or {"throughput": 1.0})
    guests.measure(booted, cell, RunDir(tmp_path).start_rep(cell.cell_id, 0))
    assert seen == [topo.receiver.ssh]


def test_kill_netserver_is_left_to_the_guest_and_logged_with_its_timing(tmp_path,
                                                                       monkeypatch):
    from types import SimpleNamespace

    from testbed.errors import GuestError
    from testbed.experiment.matrix import expand
    from testbed.run import session
    from testbed.run.folder import RunDir
    from testbed.run.repetition import start_window_command

    guests, logged = _faulty_guests(tmp_path, "kill-netserver")
    cell = expand(guests.exp)[0]
    guests.fault = session.Fault(cell.cell_id, "kill-netserver")
    monkeypatch.setattr(session.os, "kill", lambda *a: pytest.fail("no host kill"))
    rx = _Receiver(tmp_path / "console-receiver.log")
    topo = _topo(tmp_path, rx, SimpleNamespace(pid=1, poll=lambda: None))

    def repetition(rx, *a, **k):
        rx.run(start_window_command("echo window\n"))
        raise GuestError("netperf failed with status 1 (netserver, the reader, is no "
                         "longer running in the receiver)")

    monkeypatch.setattr(session, "run_repetition", repetition)
    with pytest.raises(GuestError, match="the reader, is no longer running"):
        guests.measure(session.Booted(topo, None, None, plugin=False), cell,
                       RunDir(tmp_path).start_rep(cell.cell_id, 0))
    assert "kill -9" in rx.commands[-1]
    # the mark was written before the repetition failed: stop() still acts on it
    assert any("killed netserver (the reader) in the receiver mid-window" in m
               and "1.00 s after the window opened" in m for m in logged)
