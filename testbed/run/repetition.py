"""One repetition of one cell on booted guests: apply the policy, measure, collect.

The receiver starts one background script that snapshots /proc, runs `perf stat`
and the reader sampler for exactly the measured window, and snapshots /proc
again; the sender runs netperf for the same window. Raw outputs are copied into
the repetition folder as they are, so analysis can always be redone from them.
Receiver and sender are `Shell`s, so a fake can stand in for a guest.
"""

from __future__ import annotations

import base64
import io
import json
import math
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from testbed.errors import GuestError, NetbedError
from testbed.experiment.config import Cell, Experiment, rcvbuf_bytes
from testbed.experiment.nicstate import diff_readback
from testbed.experiment.policies import ResolvedPolicy, apply_script, netserver_cpu
from testbed.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from testbed.formats import netperf, payload, reader, record, sockqueue, stamps, tcpinfo
from testbed.formats.offloads import OFFLOAD_SCRIPT, OffloadState, parse_offloads
from testbed.formats.offloads import RAW as OFFLOADS_RAW
from testbed.formats.readback import RAW as READBACK_RAW
from testbed.formats.readback import (
    RAW_AFFINITY,
    NicInfo,
    find_nic_irqs,
    nic_info_command,
    parse_nic_info,
    parse_readback,
    readback_commands,
)
from testbed.formats.windowrates import window_rates
from testbed.run.folder import RepDir
from testbed.run.loop import PolicyMismatch
from testbed.run.phases import CountingShell, Phases
from testbed.run.traffic import (
    console_closed,
    console_offset,
    run_until_window_closes,
    stop_command,
    wait_until,
)
from testbed.run.window import (
    CLOSED_MARK,
    NETPERF_CAP_S,
    WINDOW_ARMED,
    WINDOW_CLOSED,
    lead_seconds,
    window_problems,
    window_script,
)
from testbed.shell import Result, Shell
from testbed.vocabulary import GUEST_DIR

RECEIVER_HOST = "198.18.0.1"


@dataclass(frozen=True)
class BootState:
    """Facts about the receiver discovered once per boot."""

    nic: NicInfo
    irqs: tuple[int, ...]
    rx_queues: tuple[str, ...]


NETSERVER_START = "pgrep -x netserver >/dev/null || netserver -p 12865 >/dev/null 2>&1"
RX_QUEUES = 'for q in /sys/class/net/*/queues/rx-*; do [ -e "$q" ] && echo "$q"; done; true'


def discover(rx: Shell, data_mac: str) -> BootState:
    """Find the data NIC by MAC, its IRQ lines and RX queues; start netserver. One round
    trip: the IRQ lines and queues of every interface come back, the host keeps the
    data NIC's."""
    out = rx.run(prepare_command(nic_info_command(data_mac), "cat /proc/interrupts",
                                 RX_QUEUES, NETSERVER_START)).stdout
    nic_text, interrupts, queues, _ = all_sections(out, 3)
    nic = parse_nic_info(nic_text, data_mac)
    return BootState(nic, tuple(find_nic_irqs(interrupts, nic.irq_names)),
                     rx_queues(queues, nic.iface))


def rx_queues(listing: str, iface: str) -> tuple[str, ...]:
    """RX_QUEUES's paths -> `iface`'s queue names (rx-0, rx-1, ...), in listing order
    (pure)."""
    prefix = f"/sys/class/net/{iface}/queues/"
    return tuple(line.strip().removeprefix(prefix) for line in listing.splitlines()
                 if line.strip().startswith(prefix) and "/" not in
                 line.strip().removeprefix(prefix))


SECTION = "@@netbed-section@@"  # between the outputs of one command's parts
FINISH_WAIT_S = 120  # after the window closed: perf's end, the trace's collection
ARMED_WAIT_S = 60  # the window script's set-up until netperf may start
NOT_FINISHED = 3  # fetch_window_command's status when the window never finished
FILL_TIMEOUT_S = 300  # a fill file's first making: 32 MiB from the CSPRNG and its digest
PREPARE_TIMEOUT_S = 120 + FILL_TIMEOUT_S  # policy, read-back, a fill file, the window's arming


def prepare_command(*parts: str) -> str:
    """Several guest scripts in one SSH round trip (each costs 0.2-0.7 s under TCG), their
    outputs split by SECTION lines (pure). Each part runs in its own subshell, so one
    part's `set -eu` stays its own; the first part that fails ends the command with
    its status, so a failed policy write is never followed by reading back."""
    body = []
    for i, part in enumerate(parts):
        if i:
            body.append(f"echo '{SECTION}'")
        body.append(f"(\n{part.rstrip()}\n)\nrc=$?; [ $rc -eq 0 ] || exit $rc")
    return "\n".join(body) + "\n"


def split_sections(text: str, count: int) -> list[str]:
    """The outputs of `prepare_command`'s parts after the first (pure); `count` of them."""
    return all_sections(text, count)[1:]


def all_sections(text: str, count: int) -> list[str]:
    """The outputs of all `count + 1` parts of a `prepare_command` (pure)."""
    pieces = text.split(SECTION + "\n")
    if len(pieces) != count + 1:
        raise GuestError(f"expected {count + 1} parts of output, got {len(pieces)}: "
                         f"{text.strip()[-300:]!r}")
    return pieces


def start_window_command(script: str) -> str:
    """Write the window script, start it detached, and return once it is armed (pure)."""
    armed = f"{GUEST_DIR}/win/{WINDOW_ARMED}"
    return (f"mkdir -p {GUEST_DIR} && cat > {GUEST_DIR}/window.sh <<'NETBED_EOF'\n"
            f"{script}NETBED_EOF\n"
            f"rm -f {GUEST_DIR}/win/{record.FINISHED} {GUEST_DIR}/win/{WINDOW_ARMED} "
            f"{GUEST_DIR}/win/{WINDOW_CLOSED}\n"
            f"nohup sh {GUEST_DIR}/window.sh > {GUEST_DIR}/window.log 2>&1 &\n"
            f"{wait_until(f'[ -e {armed} ]', ARMED_WAIT_S)}; [ -e {armed} ] || exit 1\n")


def fetch_window_command() -> str:
    """Once the window has finished, its files as one base64-armoured tar stream (a
    shell's output is text); status NOT_FINISHED if it does not finish in time (pure)."""
    finished = f"{GUEST_DIR}/win/{record.FINISHED}"
    return (f"{wait_until(f'[ -e {finished} ]', FINISH_WAIT_S)}; "
            f"[ -e {finished} ] || exit {NOT_FINISHED}; "
            f"tar -C {GUEST_DIR}/win --exclude=./{record.FINISHED} --exclude=./{WINDOW_CLOSED} "
            f"-cf - . | base64 -w 0")


def unpack_window(armoured: str, rep: RepDir) -> list[str]:
    """Write the regular files of the window's tar stream into the repetition folder,
    each atomically, byte for byte; returns their relative paths. Refuses names that
    would leave the folder."""
    written = []
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(armoured)), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            rel = PurePosixPath(member.name.removeprefix("./"))
            if rel.is_absolute() or ".." in rel.parts:
                raise GuestError(f"the window's tar stream names {member.name!r}")
            data = tar.extractfile(member)
            assert data is not None  # a regular file always has data
            atomic_write_bytes(rep.path.joinpath(*rel.parts), data.read())
            written.append(str(rel))
    return written


def _fetch(rx: Shell) -> Result:
    """The window's files once it has finished (fetch_window_command), status unchecked."""
    return rx.run(fetch_window_command(), timeout=FINISH_WAIT_S + 30, check=False)


def _reader_gone(rx: Shell) -> str:
    """After netperf failed: whether netserver, the reader's side, still runs in the
    receiver (a reader that died mid-window is why, not the sender); "" if it runs or
    the receiver cannot say."""
    try:
        res = rx.run("pgrep -x netserver >/dev/null", timeout=30, check=False)
    except NetbedError:
        return ""
    return " (netserver, the reader, is no longer running in the receiver)" \
        if res.exit_code == 1 else ""


def _fill_plan(cell: Cell, kind: str) -> tuple[payload.Payload, str, tuple[str, ...]]:
    """The payload asked for, the command that makes its fill file and reports it, and the
    guests that send payload, in the order their reports are read (pure)."""
    size = int(cell.workload.message_size)
    chosen = payload.random_fill(size) if kind == "random-fill" else payload.netperf_default(size)
    return chosen, payload.make_fill_command(chosen), payload.sending_sides(cell.workload.name)


def run_repetition(rx: Shell, tx: Shell, boot: BootState, exp: Experiment, cell: Cell,
                   resolved: ResolvedPolicy, rep: RepDir, pmu: bool,
                   cachemodel: bool | None = None, payload_kind: str = "random-fill",
                   tracing: bool | None = None, phases: Phases | None = None,
                   console: Path | None = None) -> dict[str, object]:
    """Measure one repetition into `rep` with receiver `rx` and sender `tx`.

    `console`, the receiver's serial console log, is where the host sees the window
    close (testbed.run.traffic): then nothing of ours runs in the receiver while it is
    measured. Without it the receiver is asked over SSH once the window may have closed.

    Raises GuestError on hangs or lost SSH (the loop reboots and retries) and
    PolicyMismatch when the receiver's state differs from the policy. `phases`, when
    given, receives the time of each phase and the round trips into each guest.
    """
    phases = phases if phases is not None else Phases()
    rx, tx = CountingShell(rx, "rx", phases), CountingShell(tx, "tx", phases)
    if cachemodel is None:  # the session's counter plan decides (counters: auto)
        cachemodel = "cachemodel" in exp.counters
    atomic_write_json(rep.file(record.CELL),
                      {**json.loads(cell.model_dump_json()), "cell_id": cell.cell_id,
                       "repetition": rep.repetition})
    atomic_write_json(rep.file(record.POLICY), resolved.as_dict())
    asked = rcvbuf_bytes(cell.rcvbuf)
    raise_rmem = None if asked is None else sockqueue.rmem_max_command(asked)
    chosen, fill_command, fill_sides = _fill_plan(cell, payload_kind)
    # One round trip into the receiver applies the policy, reads it back, makes its fill
    # file (when it sends payload) and starts the window, returning once the window is
    # armed (netperf starts only then: the trace is on, the previous reader noted; the
    # warm-up is the measured connection's own traffic before the window opens). The
    # sender makes its fill file meanwhile, over its own connection.
    # the window's close mark is the first after this offset (one window at a time)
    closed = (None if console is None else
              console_closed(console, console_offset(console), CLOSED_MARK))
    parts = [apply_script(resolved, boot.nic.iface, boot.irqs, boot.rx_queues, gro=cell.gro),
             readback_commands(boot.nic.iface, boot.irqs, resolved.sysctl_keys),
             OFFLOAD_SCRIPT, *([raise_rmem] if raise_rmem else []),
             *([fill_command] if "receiver" in fill_sides else []),
             start_window_command(window_script(exp, pmu, cachemodel, iface=boot.nic.iface,
                                                tracing=tracing))]
    with phases.phase("prepare"), ThreadPoolExecutor(1, "netbed-sender") as pool:
        sender_fill = (pool.submit(tx.run, fill_command, timeout=FILL_TIMEOUT_S)
                       if "sender" in fill_sides else None)
        # the guest's own command timeout (a hung receiver fails at its first command),
        # unless the receiver may be making a fill file (it had a timeout of its own)
        applied = rx.run(prepare_command(*parts), timeout=PREPARE_TIMEOUT_S
                         if "receiver" in fill_sides else None)
        fill_out = {"sender": sender_fill.result().stdout if sender_fill else ""}
    readback_text, offloads_text, *rest = split_sections(applied.stdout, len(parts) - 1)
    rmem_text = rest[:1] if raise_rmem else []
    if "receiver" in fill_sides:
        fill_out["receiver"] = rest[-2]
    atomic_write_text(rep.file(OFFLOADS_RAW), offloads_text)
    offloads = parse_offloads(offloads_text)
    fill = chosen
    for side in fill_sides:
        fill = payload.parse_fill_provenance(fill, fill_out[side])
    atomic_write_json(rep.file(payload.RAW), fill.as_dict())
    fill_global = payload.netperf_global_args(fill, cell.workload.name)
    fill_test = [*payload.netperf_test_args(fill), *netperf.receive_buffer_args(asked)]
    netperf_cap = exp.duration + math.ceil(lead_seconds(exp)) + NETPERF_CAP_S
    fetching: list[Future[Result]] = []
    # the window's files are fetched while the sender is told to stop (its own guest);
    # a MAERTS stop goes to the receiver, so its fetch waits for the stop
    overlap = stop_command(cell.workload.name, "")[0] == "sender"
    closed_at: list[float] = []

    def window_closed() -> None:
        closed_at.append(phases.clock())
        if overlap:
            fetching.append(pool.submit(_fetch, rx))

    with ThreadPoolExecutor(1, "netbed-fetch") as pool:
        with phases.phase("traffic"):
            traffic = run_until_window_closes(
                rx, tx, netperf.netperf_command(RECEIVER_HOST, cell.workload, netperf_cap,
                                                netserver_cpu(resolved),
                                                global_args=fill_global, test_args=fill_test),
                cell.workload.name, closed_file=f"{GUEST_DIR}/win/{WINDOW_CLOSED}",
                reader_pid_file=f"{GUEST_DIR}/win/{reader.RAW_PID}", cap_s=netperf_cap,
                earliest_close_s=lead_seconds(exp) + exp.duration,
                on_closed=window_closed, closed=closed)
        if closed_at:
            phases.split("traffic", "stop", closed_at[0])
        with phases.phase("fetch"):
            fetched = fetching[0].result() if fetching else None
    if traffic.exit_code == 124:
        raise GuestError(f"netperf ran past its cap plus margin ({netperf_cap} s)")
    atomic_write_text(rep.file(netperf.RAW), traffic.output)
    if traffic.exit_code != 0:
        raise GuestError(f"netperf failed with status {traffic.exit_code}"
                         f"{_reader_gone(rx)}: {traffic.output.strip()[-300:]}")
    if fetched is None:
        with phases.phase("fetch"):
            fetched = _fetch(rx)
    if fetched.exit_code == NOT_FINISHED:
        raise GuestError("the receiver's measurement window did not finish within "
                         f"{FINISH_WAIT_S} s of the window's close")
    if not fetched.ok:
        raise GuestError(f"fetching the window's files failed ({fetched.exit_code}): "
                         f"{fetched.stderr.strip()[-300:]}")
    with phases.phase("check"):
        return _check_window(fetched.stdout, rep, boot, cell, resolved, readback_text,
                             offloads, rmem_text, traffic.stopped_by)


def _check_window(armoured: str, rep: RepDir, boot: BootState, cell: Cell,
                  resolved: ResolvedPolicy, readback_text: str, offloads: OffloadState,
                  rmem_text: list[str], stopped_by: str) -> dict[str, object]:
    """Unpack the window's files, check them and the policy read-back, and return
    `done`'s info (host-side only)."""
    unpack_window(armoured, rep)
    if rep.file(record.ERROR).exists():
        raise GuestError(f"measurement window: {rep.file(record.ERROR).read_text().strip()}")
    problems = window_problems(rep.path)
    if problems:
        raise GuestError("measurement window: " + "; ".join(problems))
    affinity = rep.file(RAW_AFFINITY)
    readback = parse_readback(readback_text + (affinity.read_text() if affinity.exists() else ""))
    atomic_write_json(rep.file(READBACK_RAW),
                      {**readback.as_dict(), "irqs": list(boot.irqs),
                       "iface": boot.nic.iface, "driver": boot.nic.driver,
                       "offloads": offloads.summary()})
    problems = diff_readback(resolved, readback, gro=cell.gro)
    if problems:
        raise PolicyMismatch(f"cell {cell.cell_id}: receiver state differs from policy "
                             f"{resolved.name!r}: " + "; ".join(problems))
    result = netperf.parse_netperf(rep.file(netperf.RAW).read_text())
    _check_rcvbuf(rep, cell, result,
                  sockqueue.parse_rmem_max(rmem_text[0]) if rmem_text else None)
    return {"throughput": result.get("THROUGHPUT"), "units": result.throughput_units,
            "rx_checksum_offload": offloads.rx_checksum_offload,
            "netperf_stopped_by": stopped_by, **_window_rates(rep, cell)}


def _check_rcvbuf(rep: RepDir, cell: Cell, result: netperf.NetperfResult,
                  rmem_max: int | None) -> None:
    """The copy-lag level's provenance (`rcvbuf.json`): what was asked, net.core.rmem_max
    in force, netserver's SO_RCVBUF as netperf read it back (asked, as set on its
    listening socket, at the end), and what the kernel should have made of the level.
    A set level whose buffer reads back otherwise fails the repetition (PolicyMismatch):
    its cell would be labelled with a queue depth it did not have."""
    size = rcvbuf_bytes(cell.rcvbuf)
    expected = None if size is None or rmem_max is None else \
        sockqueue.kernel_rcvbuf(size, rmem_max)
    read = {k: result.get(k) for k in ("RSR_SIZE_REQ", "RSR_SIZE", "RSR_SIZE_END")}
    atomic_write_json(rep.file(sockqueue.RAW_RCVBUF), {
        "level": cell.rcvbuf, "asked_bytes": size, "rmem_max": rmem_max,
        "mechanism": ("autotuned (tcp_rmem); nothing set" if size is None else
                      "netperf -S ,N: netserver's SO_RCVBUF on its listening socket"),
        "expected_rcvbuf_bytes": expected, "netperf": read})
    if size is not None and read["RSR_SIZE"] != expected:
        raise PolicyMismatch(f"cell {cell.cell_id}: rcvbuf {cell.rcvbuf} should give "
                             f"SO_RCVBUF {expected} (rmem_max {rmem_max}), netserver's "
                             f"socket read back {read['RSR_SIZE']}")


def _window_rates(rep: RepDir, cell: Cell) -> dict[str, float]:
    """The window's own rates for `done` (the adaptive rule reads them); none when the
    window's files cannot say, which analysis then reports with the reason."""
    try:
        return window_rates(rep.file(stamps.RAW).read_text(),
                            rep.file(tcpinfo.RAW_BEFORE).read_text(),
                            rep.file(tcpinfo.RAW_AFTER).read_text(),
                            cell.workload.name, int(cell.workload.message_size))
    except (OSError, NetbedError):
        return {}
