"""The payload path in model.c/payload.c, on traces (model_trace, no QEMU).

Known patterns first (a device write, a checksum pass, a copy on the same or another
CPU, a copy after the line left every cache), then golden traces of the bookkeeping,
and the proof that it leaves the model's counts alone: the same traces with and without
the pass ranges give the same counters, sites and c2c rows, and the existing golden
traces give their golden counts with the pass ranges loaded.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.formats import payloadpath as pp
from tests.unit.test_cachemodel_golden import CASES, GOLDEN, KERNEL_PCS, TraceGen, mixed_trace

pytestmark = pytest.mark.process  # runs the compiled model_trace

LINE = 64
CSUM_PC, COPY_PC, OTHER_PC = 0xFFFFFFFF81001000, 0xFFFFFFFF81002000, 0xFFFFFFFF81003000
PASSES = pp.format_passes([(CSUM_PC, CSUM_PC + 0x100, "checksum"),
                           (COPY_PC, COPY_PC + 0x100, "copy")])


def run(binary: Path, tmp: Path, trace: str, passes: str | None = PASSES,
        **cfg: int) -> tuple[str, pp.PayloadPath | None]:
    """(counters + sites + c2c text, payload statistics) of one model_trace run."""
    sites, c2c, payload = tmp / "sites.csv", tmp / "c2c.csv", tmp / "payload.csv"
    args = [f"{k}={v}" for k, v in cfg.items()] + [f"sites={sites}", f"c2c={c2c}",
                                                    f"payload={payload}"]
    if passes is not None:
        (tmp / "passes.txt").write_text(passes)
        args.append(f"passes={tmp / 'passes.txt'}")
    proc = subprocess.run([str(binary), *args], input=trace, capture_output=True, text=True,
                          check=True)
    counts = f"# counters\n{proc.stdout}# sites\n{sites.read_text()}# c2c\n{c2c.read_text()}"
    return counts, pp.parse(payload.read_text(), "payload.csv")


def buffer(addr: int, nbytes: int, cpu: int, pc: int, digest: int, rw: str = "l") -> list[str]:
    """Word-by-word accesses to a buffer, every line with digest `digest + line`."""
    return [f"@{pc:#x} {cpu} k {rw} {a:#x} 8 {digest + a // LINE}"
            for a in range(addr, addr + nbytes, 8)]


def receive(cpu_csum: int, cpu_copy: int, evict_between: bool = False, lines: int = 16) -> str:
    """A CPU writes a buffer (allocation), a device overwrites it, the checksum reads it
    on `cpu_csum`, the copy reads it on `cpu_copy`."""
    base, n = 0x100000, lines * LINE
    out = buffer(base, n, 0, OTHER_PC, 1000, "s")          # the kernel zeroes the page
    out += buffer(base, n, cpu_csum, CSUM_PC, 5000)        # new bytes: a device wrote them
    if evict_between:  # 16 MiB of other lines: out of L1, L2 and the 8 MiB LLC
        out.append(f"@{OTHER_PC:#x} S {cpu_copy} k l 0x4000000 {16 << 20} {LINE}")
    out += buffer(base, n, cpu_copy, COPY_PC, 5000)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize(("csum", "copy", "evict", "where", "relation"), [
    (0, 0, False, "own", "same_cpu"),
    (0, 1, False, "peer_clean", "other_cpu"),
    (0, 0, True, "memory", "same_cpu"),
])
def test_the_copy_read_is_recorded_where_the_model_served_it(model_trace, tmp_path, csum, copy,
                                                            evict, where, relation):
    _, got = run(model_trace, tmp_path, receive(csum, copy, evict))
    assert got is not None
    assert got.records["noticed"] == 16
    assert got.first_read == {"other": 0, "checksum": 16, "copy": 0}
    assert {k: v for k, v in got.copy_from.items() if v} == {(where, relation): 16}
    # lag: device writes noticed between a line's checksum read and its copy: 15 .. 0
    assert got.lag_kb["checksum"] == {0: 16}
    rows = {r.metric: r for r in pp.tidy_rows(got)}
    key = "peer" if where.startswith("peer") else where
    assert rows[f"cache.payload_copy_from.{key}"].value == 1.0
    assert rows["cache.payload_checksum_cpu_is_copy_cpu"].value == (1.0 if csum == copy else 0)


def test_the_record_survives_the_lines_eviction_and_the_lag_counts_later_device_writes(
        model_trace, tmp_path):
    """Checksum one buffer, then 64 KiB of other received lines, then copy the first:
    its lag is 64 KB, although the line left every cache in between (the model's own
    device mark went with it: the copy's access counts as data=cpu)."""
    first = 0x100000
    out = buffer(first, 1024, 0, OTHER_PC, 1000, "s") + buffer(first, 1024, 0, CSUM_PC, 5000)
    later = 0x200000
    out += buffer(later, 64 << 10, 0, OTHER_PC, 1000, "s")
    out += buffer(later, 64 << 10, 0, CSUM_PC, 9000)
    out.append(f"@{OTHER_PC:#x} S 0 k l 0x4000000 {16 << 20} {LINE}")
    out += buffer(first, 1024, 1, COPY_PC, 5000)
    _, got = run(model_trace, tmp_path, "\n".join(out) + "\n")
    assert got is not None
    assert got.copy_from[("memory", "other_cpu")] == 16
    assert got.lag_kb["checksum"] == {64: 16}  # 1024 + 15..0 lines after each: 64 KB


def test_an_offloading_nic_has_no_checksum_pass_and_its_lag_is_not_observed(model_trace,
                                                                           tmp_path):
    base = 0x100000
    out = buffer(base, 1024, 0, OTHER_PC, 1000, "s") + buffer(base, 1024, 1, COPY_PC, 5000)
    _, got = run(model_trace, tmp_path, "\n".join(out) + "\n")
    assert got is not None
    assert got.first_read["copy"] == 16
    assert got.copy_from[("llc", "no_checksum")] == 16  # DDIO: the device wrote into the LLC
    assert got.records["lag_unknown"] == 16
    rows = {r.metric: r for r in pp.tidy_rows(got)}
    assert rows["cache.payload_lag_kb.p50"].status == "not-supported"
    assert rows["cache.payload_checksum_cpu_is_copy_cpu"].status == "not-supported"
    assert rows["cache.payload_copy_from.llc"].value == 1.0


def test_a_cpu_store_closes_the_record_and_a_new_device_write_reopens_it(model_trace, tmp_path):
    base = 0x100000
    out = buffer(base, 64, 0, OTHER_PC, 1000, "s") + buffer(base, 64, 0, CSUM_PC, 5000)
    out += buffer(base, 64, 1, OTHER_PC, 7000, "s")  # freed and reused before any copy
    out += buffer(base, 64, 0, CSUM_PC, 8000)         # a new device write
    out += buffer(base, 64, 0, CSUM_PC, 9000)         # and another, before its copy
    out += buffer(base, 64, 0, COPY_PC, 9000)
    _, got = run(model_trace, tmp_path, "\n".join(out) + "\n")
    assert got is not None
    assert got.records["noticed"] == 3
    assert got.records["closed_by_store"] == 1
    assert got.records["unfinished"] == 1
    assert got.copy_from[("own", "same_cpu")] == 1


def test_without_pass_ranges_the_rows_say_why(model_trace, tmp_path):
    _, got = run(model_trace, tmp_path, receive(0, 1), passes=None)
    assert got is not None and got.records["pass_ranges"] == 0
    assert not any(got.copy_from.values())
    assert {r.status for r in pp.tidy_rows(got)} == {"not-supported"}


def test_a_bad_passes_file_is_refused_with_its_line(model_trace, tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as exc:
        run(model_trace, tmp_path, "", passes="# x\nffff 10 copy\n")
    assert "line 2" in exc.value.stderr


# ---------------------------------------------------------------- golden bookkeeping
@dataclass
class Receive(TraceGen):
    """TraceGen with the site chosen by the caller (None: its random choice)."""

    pc: int | None = None

    def site(self, mode: str) -> str:
        return f"@{self.pc:#x} " if self.pc is not None else super().site(mode)


def payload_trace(seed: int, ncpus: int, rounds: int) -> str:
    """A receive path: a ring of 2 KiB buffers the device fills, the checksum on the IRQ
    CPU, a queue of random depth, then a byte-wise copy on a reader CPU; page reuse
    (stores), other work that evicts, windows."""
    rng = random.Random(seed)
    g = Receive(ncpus, rng)
    ring = [0x800000 + 2048 * i for i in range(128)]
    queue: list[tuple[int, int]] = []
    slot = 0
    for i in range(rounds):
        if i == rounds // 4:  # the bookkeeping starts again with the window
            g.raw("window")
        r = rng.random()
        if r < 0.55:  # a packet: device write, checksum on the IRQ CPU
            buf, irq = ring[slot % len(ring)], rng.choice([0, 0, 1])
            slot += 1
            g.device_write(buf, 1536)
            g.pc = CSUM_PC if rng.random() < 0.8 else OTHER_PC  # some: an offloading NIC
            for off in range(0, 1536, 8):
                g.access(irq, buf + off, False, "k")
            queue.append((buf, irq))
        elif r < 0.85 and queue:  # the reader copies the oldest queued packets
            reader = rng.randrange(ncpus)
            for _ in range(rng.randint(1, len(queue))):
                buf, _irq = queue.pop(0)
                for off in range(0, 1536, rng.choice([1, 8])):
                    g.pc = COPY_PC
                    g.access(reader, buf + off, False, "k", 1)
                    g.access(reader, 0x3000000 + off % 4096, True, "k", 1)
        elif r < 0.9:  # a page reused: zeroed by a CPU
            g.pc = OTHER_PC
            base = rng.choice(ring) & ~4095
            for off in range(0, 4096, 8):
                g.access(rng.randrange(ncpus), base + off, True, "k")
        else:  # other work that evicts lines
            g.pc = None
            g.raw(f"@{rng.choice(KERNEL_PCS):#x} S {rng.randrange(ncpus)} k l "
                  f"{rng.randrange(0, 1 << 26, 4096):#x} {rng.choice([256 << 10, 2 << 20])} "
                  f"{LINE}")
    return "\n".join(g.out) + "\n"


PAYLOAD_CASES = {"payload-two-cpus": (11, 2, 600, {}),
                 "payload-three-cpus-no-l2-no-ddio": (12, 3, 600, {"l2_size": 0, "ddio": 0})}


@pytest.mark.parametrize("name", sorted(PAYLOAD_CASES))
def test_payload_bookkeeping_is_unchanged_and_leaves_the_counts_alone(model_trace, tmp_path,
                                                                     name):
    seed, ncpus, rounds, cfg = PAYLOAD_CASES[name]
    trace = payload_trace(seed, ncpus, rounds)
    counts, got = run(model_trace, tmp_path, trace, PASSES, ncpus=ncpus, **cfg)
    (tmp_path / "blind").mkdir()
    blind, _ = run(model_trace, tmp_path / "blind", trace, passes=None, ncpus=ncpus, **cfg)
    assert counts == blind  # the records never feed back into the model
    assert got is not None and got.records["noticed"] > 1000
    assert sum(got.copy_from.values()) > 500 and got.lag_kb.get("checksum")
    text = (tmp_path / "payload.csv").read_text()
    golden = GOLDEN / f"golden-{name}.txt"
    if os.environ.get("NETBED_REGENERATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), (f"payload statistics differ from {golden}; if the "
                                        "bookkeeping changed on purpose, regenerate "
                                        "(test_cachemodel_golden's docstring)")


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_existing_golden_traces_keep_their_counts_with_pass_ranges_loaded(model_trace,
                                                                              tmp_path, name):
    """Half the golden traces' kernel sites become checksum or copy instructions."""
    seed, ncpus, phases, cfg = CASES[name]
    passes = pp.format_passes([(pc, pc + 0x40, ("checksum", "copy")[i % 2])
                               for i, pc in enumerate(KERNEL_PCS[:12])])
    counts, got = run(model_trace, tmp_path, mixed_trace(seed, ncpus, phases), passes=passes,
                      ncpus=ncpus, **cfg)
    assert got is not None and got.records["pass_ranges"] == 12
    assert counts == (GOLDEN / f"golden-{name}.txt").read_text()
