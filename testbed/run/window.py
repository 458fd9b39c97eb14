"""The receiver's measured window: one guest shell script, built here (pure).

Every number of a repetition must describe the same seconds, so everything the
receiver counts is read by this one script, at the window's two edges.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from testbed.experiment.config import Experiment
from testbed.formats import perfstat, readback, reader, record, sockqueue, trace
from testbed.formats.readback import ABSENT
from testbed.vocabulary import GUEST_DIR

RECEIVER_IP = "198.18.0.1"  # the receiver's data-plane address (testbed.vm.dataplane)
PERF_FILE = perfstat.RAW
PERF_CTL = "perf.ctl"  # perf's control FIFO: `enable` / `disable` (perf stat --control)
PERF_ACK = "perf.ack"  # perf answers `ack` there once it has done so
# 20 Hz: nbsample keeps it even when both vCPUs are busy; each round also samples the
# reader's socket queues (one sock_diag lookup per socket: testbed.formats.sockqueue)
SAMPLER_INTERVAL_S = 0.05
WINDOW_LEAD_S = 0.5  # the least connection ramp before the window opens
# Model windows arm the cache model after the warm-up and let it settle this long before
# `begin`: the code-cache flush and most of QEMU's retranslation with callbacks happen
# then, not at `begin` (where, on QEMU 10.0, they stalled the vCPU 28-40 ms).
ARM_SETTLE_S = 0.3
# netperf runs until the window has closed (testbed.run.traffic stops it); this caps
# it when something goes wrong: the reader's wait, the window, a slow model's edges.
NETPERF_CAP_S = 180
READER_WAIT_S = 60
WINDOW_ARMED = record.ARMED  # touched once the trace is armed: the sender may start netperf
WINDOW_CLOSED = record.CLOSED  # touched once the inner script (every edge read) has ended
# ... and this line written to the serial console then: the host waits for it in the
# console log (testbed.run.traffic), running nothing in the receiver until it is there
CLOSED_MARK = "netbed-window-closed"
SNAP_ERRORS = record.SNAP_ERRORS  # nbsnap's complaints; analysis reports them
PERF_KEPT_OUT = ("perf is kept out of cache-model windows (its edges lagged the window's "
                 "by up to 246 ms under the model); its software counters come from the "
                 "plain repetitions, context switches also from /proc (stat.ctxt)")


def window_script(exp: Experiment, pmu: bool, cachemodel: bool, *, iface: str | None = None,
                  local_ip: str = RECEIVER_IP, tracing: bool | None = None) -> str:
    """The receiver's measured-window script (pure).

    It arms the tracepoints, starts `nbsnap` (images/tools/nbsnap.c: the edge reads done
    by a process already running, so each costs system calls, not a fork: `ss` and `cat`
    took 0.7-0.8 s each under TCG) and, in plain windows, `perf stat -a -A` with its
    events disabled over an inner script, and says it is armed (netperf may start);
    perf's start overlaps netperf's instead of delaying the window. The inner script
    waits until netserver's data process (the reader) exists, lets the connection ramp
    for the warm-up (at least WINDOW_LEAD_S; the warm-up is traffic of the measured
    connection itself, which costs no second netperf start, SSH round trip and
    connection set-up), and then is the window. Nested from the outside in: perf's
    counting (plain windows; enabled and disabled through its control FIFO, each between
    two stamps), the cache model's markers (model windows), the units (every established
    TCP connection's tcp_info, the data NIC's statistics), the trace, the /proc
    snapshots, and the reader sampler (where the reader runs, and how much payload waits
    in its socket: sockqueue.txt) with `sleep duration` in the middle. The markers
    sit right against the units because reads inside a region run ~10x slower; nbsnap
    makes them cheap there (sockets borrowed and files opened before the window, results
    written after the line: a units read ~10 ms inside a region), so the model's counts
    and the units describe the same seconds within ~10 ms (the plugin's stalls at the
    markers, 1-8 ms at begin and 6-57 ms at end, lie outside the model's counting).
    Model windows arm the plugin after the warm-up (`mark arm`, ARM_SETTLE_S before the
    reader's sockets are borrowed and their reads warmed, and before `begin`): on QEMU
    10.0 the plugin drops its instrumentation after each window, and re-arming flushes
    QEMU's code cache and retranslates what runs next; done at `begin` that stalled the
    marking vCPU 28-40 ms and slowed the units read after it to 25-87 ms. Armed ahead,
    `begin` only starts counting (on 7.2 the plugin stays armed and `arm` is a no-op).
    Analysis takes /proc's figures from plain repetitions (a model window runs at the
    model's pace). nbsnap stamps each read before and after (guest monotonic clock), so
    analysis knows the window's length and how far each source's edges lie from the
    units' (`window.skew`).

    netperf runs until the window has closed (WINDOW_CLOSED; testbed.run.traffic
    then stops it), so the window lies inside the transfer however slowly the
    receiver runs. Tracing is kept out of cache-model windows (its own memory
    accesses would be counted): `tracing=None` means "on unless the cache model runs".

    perf is kept out of cache-model windows too (`perf-unsupported` says why; the
    inner script then runs under `timeout` alone). Its counting is switched by an
    ioctl per event and CPU, with perf hopping to each CPU in turn, and under the
    model those acknowledgements landed 74-246 ms from the units' reads in 3 of 120
    model windows (2026-11-30), once with perf SCHED_FIFO, while the model's markers,
    the units and /proc, read in one nbsnap line, stayed within 20 ms. Its software
    counts there time the model, and the statistics take them from plain
    repetitions anyway (`collate.by_kind`); /proc's `ctxt` gives the context
    switches of the same window (0-5% below perf's, whose window was wider).
    """
    d = GUEST_DIR
    w = f"{d}/win"
    tracing = (not cachemodel) if tracing is None else tracing
    lead = lead_seconds(exp)
    counted = not cachemodel  # perf stat around the window (see the docstring)
    settle = ARM_SETTLE_S if cachemodel else 0.0  # the model's `mark arm` (below)
    margin = 30 + READER_WAIT_S + lead + settle
    inner_sh = ("sh", f"{d}/inner.sh")
    if counted:
        outer = perfstat.perf_stat_command(exp.duration, perfstat.perf_events(pmu),
                                           output=f"{d}/{PERF_FILE}", command=inner_sh,
                                           control=(f"{d}/{PERF_CTL}", f"{d}/{PERF_ACK}"),
                                           timeout_margin=margin)
    else:
        outer = perfstat.with_timeout(inner_sh, exp.duration, margin)
    sampler = reader.reader_sampler_command(exp.duration, SAMPLER_INTERVAL_S,
                                            queue_file=sockqueue.sampler_args(w))
    polls = int(READER_WAIT_S / 0.1)
    traced = tracing and bool(iface)
    up = f'read -r nbup _ < /proc/uptime; echo "$nbup {{}}" >> {w}/{record.SETUP_TIMES}'
    inner = [f"exec 3>{d}/snap.in 4<{d}/snap.out",
             'snap() { echo "$*" >&3; read -r ack <&4; '
             f'case "$ack" in ok*) ;; *) echo "$* -> $ack" >> {w}/{SNAP_ERRORS} ;; esac; }}',
             f"i=0; until {_reader_exists()}; do i=$((i + 1)); "
             f"if [ $i -gt {polls} ]; then echo 'no reader within {READER_WAIT_S} s' "
             f"> {w}/{record.ERROR}; echo quit >&3; read -r ack <&4; exit 0; fi; sleep 0.1; done",
             "pid=$r",
             up.format("reader"),
             f"sleep {lead:g}",
             *([f'snap "mark arm"; sleep {settle:g}'] if cachemodel else []),
             # builtins only: the reader's allowed CPUs, for the policy read-back
             f'{{ if [ -r /proc/$pid/status ]; then while read -r k v; do '
             f'[ "$k" = Cpus_allowed_list: ] && echo "reader.$pid=$v"; '
             f"done < /proc/$pid/status; "
             f"else echo 'reader.none={ABSENT}'; fi; }} > {w}/{readback.RAW_AFFINITY} 2>&1",
             f'echo "$pid" > {w}/{reader.RAW_PID}',
             'echo "reader $pid" >&3; read -r ack <&4']
    if counted:
        # nbsnap talks to perf's control FIFOs itself (opened read-write: no block)
        # and makes perf (this script's parent) SCHED_FIFO, so its edges do not
        # wait behind the reader (images/tools/nbsnap.c, perf_raise)
        inner.append(f'snap "perfctl {d}/{PERF_CTL} {d}/{PERF_ACK} $PPID"')
    inner.append(up.format("nbsnap"))
    # One line per edge, done by nbsnap back to back (one round trip each), perf's
    # enable/disable included: nbsnap stamps around it, so its edge is bracketed, and
    # it sits next to the marker instead of one shell round trip away.
    mark = cachemodel
    trace_on = f"[ -e {w}/{trace.RAW_UNSUPPORTED} ] && t= || t='; trace on'"
    trace_off = f"[ -e {w}/{trace.RAW_UNSUPPORTED} ] && t= || t='trace off; '"
    if traced:
        inner.append(trace_on)
    inner.append('snap "' + ("perf enable; " if counted else "")
                 + ("mark begin; " if mark else "") + "units before"
                 + ('${t}' if traced else "") + '; proc before"')
    inner += [f"( {sampler} ) > {w}/{reader.RAW} 2> {w}/{reader.RAW_ERRORS} &",
              f"sleep {exp.duration:g}", "wait"]
    if traced:
        inner.append(trace_off)
    inner.append('snap "proc after; ' + ('${t}' if traced else "") + "units after"
                 + ("; mark end" if mark else "") + ("; perf disable" if counted else "")
                 + '"')
    inner.append("echo quit >&3; read -r ack <&4")
    lines = [f"rm -rf {w} && mkdir -p {w}", up.format("start")]
    if traced and iface:
        lines.append(trace.setup_command(iface, w))
    elif tracing:
        lines.append("echo 'no data NIC named: tracing needs its interface' "
                     f"> {w}/{trace.RAW_UNSUPPORTED}")
    else:
        why = ("tracing is kept out of cache-model windows (the tracer's own memory "
               "accesses would be counted)" if cachemodel else "tracing turned off")
        lines.append(f"echo {shlex.quote(why)} > {w}/{trace.RAW_UNSUPPORTED}")
    if not counted:
        lines.append(f"echo {shlex.quote(PERF_KEPT_OUT)} > {w}/{perfstat.RAW_UNSUPPORTED}")
    lines += [
        # a data process left from an earlier test is not the reader
        f"old=$({_reader_pid()}); export old",
        # nbsnap starts now, before netperf, and learns the reader's pid later: after the
        # reader appears nothing forks (forks took seconds under load)
        f"rm -f {d}/snap.in {d}/snap.out {d}/{PERF_CTL} {d}/{PERF_ACK} && "
        f"mkfifo {d}/snap.in {d}/snap.out {d}/{PERF_CTL} {d}/{PERF_ACK}",
        f"nbsnap {w} {iface or 'none'} 0 < {d}/snap.in > {d}/snap.out "
        f"2>> {w}/{SNAP_ERRORS} &",
        f"exec 3>{d}/snap.in 4<{d}/snap.out",
        f"cat > {d}/inner.sh <<'NETBED_INNER'\n" + "\n".join(inner) + "\nNETBED_INNER",
        f"( {outer} ) 2> {w}/{perfstat.RAW_ERRORS if counted else record.INNER_ERRORS} &",
        "window_job=$!",
        f"touch {w}/{WINDOW_ARMED}",
        "wait $window_job",
        up.format("window-done"),
        f"touch {w}/{WINDOW_CLOSED}",
        f"echo {CLOSED_MARK} > /dev/console 2>/dev/null",
    ]
    if counted:
        lines.append(f"mv {d}/{PERF_FILE} {w}/{PERF_FILE} 2>/dev/null")
    if traced and iface:
        lines.append(trace.collect_command(w))
    lines.append(f"touch {w}/{record.FINISHED}")
    return "\n".join(lines) + "\n"


def lead_seconds(exp: Experiment) -> float:
    """Traffic on the measured connection before the window opens: the config's warm-up."""
    return max(WINDOW_LEAD_S, float(exp.warmup))


def window_problems(folder: Path) -> list[str]:
    """Why a fetched window cannot be used (empty when it can): nbsnap's complaints and
    missing edge reads. A kernel that cannot trace is not a problem here: that gives
    `not-supported` rows, and the repetition stands."""
    problems = []
    errors = folder / SNAP_ERRORS
    if errors.is_file() and errors.read_text().strip():
        problems.append("nbsnap: " + " | ".join(errors.read_text().strip().splitlines()[:3]))
    for name in ("stamps.txt", "tcpinfo-before.txt", "tcpinfo-after.txt"):
        if not (folder / name).is_file():
            problems.append(f"no {name}")
    if not (folder / PERF_FILE).is_file() and not (folder / perfstat.RAW_UNSUPPORTED).is_file():
        problems.append(f"no {PERF_FILE}")
    return problems


def _reader_pid() -> str:
    return 'd=$(pgrep -o -x netserver) && pgrep -n -x -P "$d" netserver'


def _reader_exists() -> str:
    return ('d=$(pgrep -o -x netserver) && r=$(pgrep -n -x -P "$d" netserver) '
            '&& [ "$r" != "$old" ]')
