"""model.c's exact output on a long mixed trace, kept as a golden file.

The model's speed work (cheaper lookups, reordered checks) must leave every count,
every attribution row and every c2c row unchanged: the validation suite checks the
model against known answers, this checks it against itself on everything at once
(streams, ping-pong, device writes, the plugin's two-slot fast path, repeats, lines
split across two, windows and cache clears, four CPUs, no L2, no DDIO).

The trace is generated from a fixed seed. After a deliberate change of the model's
behaviour, regenerate with `NETBED_REGENERATE_GOLDEN=1 pytest tests/unit/test_cachemodel_golden.py`
and say why in the commit.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.settings import REPO_ROOT

GOLDEN = REPO_ROOT / "tests" / "fixtures" / "cachemodel"
LINE = 64
KERNEL_PCS = [0xFFFFFFFF81000000 + 0x40 * i for i in range(24)]
# static tools below 4 GiB stay exact; PIE / library pcs share a block per TiB
USER_PCS = ([0x401000 + 0x10 * i for i in range(12)]
            + [0x5555_5555_0000 + 0x100 * i for i in range(6)]
            + [0x7F00_0000_0000 + 0x1000 * i for i in range(6)])


@dataclass
class TraceGen:
    """Writes a trace and mirrors what the plugin would know: the line contents (as
    digests) and which line each CPU's memo slots hold (for P lines)."""

    ncpus: int
    rng: random.Random
    out: list[str] = field(default_factory=list)
    version: dict[int, int] = field(default_factory=dict)
    memo: list[list[int]] = field(default_factory=list)
    mru: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        self.memo = [[-1, -1] for _ in range(self.ncpus)]
        self.mru = [0] * self.ncpus

    def digest(self, line: int) -> int:
        return (line * 0x9E3779B97F4A7C15 + self.version.get(line, 0) * 0xC2B2AE3D27D4EB4F
                ) % (1 << 63) | 1

    def site(self, mode: str) -> str:
        if self.rng.random() < 0.1:
            return ""
        return f"@{self.rng.choice(KERNEL_PCS if mode == 'k' else USER_PCS):#x} "

    def access(self, cpu: int, addr: int, store: bool, mode: str = "", size: int = 8) -> None:
        mode = mode or self.rng.choice("kku")
        line = addr // LINE
        crosses = addr % LINE + size > LINE
        if store:
            self.version[line] = self.version.get(line, 0) + 1
            if crosses:
                self.version[line + 1] = self.version.get(line + 1, 0) + 1
        slots = self.memo[cpu]
        slot = slots.index(line) if line in slots else 1 - self.mru[cpu]
        evicted = self.digest(slots[slot]) if slots[slot] >= 0 else 0
        self.out.append(f"{self.site(mode)}P {cpu} {mode} {'s' if store else 'l'} {addr:#x} "
                        f"{size} {self.digest(line)} {evicted}")
        # the driver keeps the slot's line unless the access crossed (then: none)
        slots[slot] = -1 if crosses else line
        self.mru[cpu] = slot

    def device_write(self, addr: int, nbytes: int) -> None:
        for line in range(addr // LINE, (addr + nbytes + LINE - 1) // LINE):
            self.version[line] = self.version.get(line, 0) + 1

    def raw(self, text: str) -> None:
        self.out.append(text)


def mixed_trace(seed: int, ncpus: int, phases: int) -> str:
    rng = random.Random(seed)
    g = TraceGen(ncpus, rng)
    for _ in range(phases):
        kind = rng.choice(["stream", "pingpong", "random", "dma", "copy", "sweep", "misc"])
        cpu = rng.randrange(ncpus)
        if kind == "stream":  # word by word through a buffer, maybe writing it
            base, n = rng.randrange(0, 1 << 24, 4096), rng.choice([4 << 10, 16 << 10, 48 << 10])
            store = rng.random() < 0.3
            for off in range(0, n, 8):
                g.access(cpu, base + off, store, "u")
        elif kind == "pingpong":  # two CPUs take turns at a few shared lines
            a, b = rng.sample(range(ncpus), 2)
            lines = [0x10000 + LINE * i for i in range(rng.randint(1, 4))]
            for i in range(rng.randint(50, 400)):
                c = a if i % 2 == 0 else b
                addr = rng.choice(lines) + 8 * rng.randrange(8)
                g.access(c, addr, False)
                g.access(c, addr, rng.random() < 0.7)
        elif kind == "random":  # scattered accesses over 4 MiB by every CPU
            for _ in range(rng.randint(500, 3000)):
                g.access(rng.randrange(ncpus), rng.randrange(0, 4 << 20, 8),
                         rng.random() < 0.3)
        elif kind == "dma":  # a device fills a ring of buffers, CPUs read them (checksum)
            base = 0x800000 + rng.randrange(64) * 4096
            g.device_write(base, 2048)
            for off in range(0, 2048, 8):
                g.access(cpu, base + off, False, "k")
            if rng.random() < 0.5:  # and a copy to user space on another CPU
                other = rng.randrange(ncpus)
                for off in range(0, 2048, 8):
                    g.access(other, base + off, False, "k")
                    g.access(other, 0x2000000 + off, True, "k")
        elif kind == "copy":  # byte-wise rep movsb: alternating source and destination
            src, dst = rng.randrange(0, 1 << 22, 64), rng.randrange(1 << 22, 1 << 23, 64)
            for off in range(rng.choice([64, 512, 4096])):
                g.access(cpu, src + off, False, "k", 1)
                g.access(cpu, dst + off, True, "k", 1)
        elif kind == "sweep":  # large strided sweeps (no digests): LLC and L2 evictions
            start = rng.randrange(0, 1 << 26, 4096)
            size = rng.choice([512 << 10, 2 << 20, 10 << 20])
            g.raw(f"{g.site('k')}S {cpu} k {'s' if rng.random() < 0.3 else 'l'} {start:#x} "
                  f"{size} {LINE}")
        else:
            r = rng.random()
            if r < 0.15:
                g.raw("window")
            elif r < 0.2:
                g.raw("clear")
                g.forget()
            elif r < 0.6:  # accesses split across two lines
                for _ in range(rng.randint(10, 200)):
                    addr = rng.randrange(0, 1 << 20, LINE) + rng.choice([57, 60, 62])
                    g.access(rng.randrange(ncpus), addr, rng.random() < 0.4, size=8)
            else:  # the old single-slot repeat lines
                addr = rng.randrange(0, 1 << 20, 8)
                g.raw(f"{cpu} u l {addr:#x}")
                for _ in range(rng.randint(1, 30)):
                    g.raw(f"{g.site('u')}R {cpu} u {rng.choice('ls')} {addr:#x}")
    return "\n".join(g.out) + "\n"


CASES: dict[str, tuple[int, int, int, dict[str, int]]] = {
    # name: seed, ncpus, phases, model_trace arguments
    "two-cpus": (1, 2, 300, {}),
    "four-cpus-no-l2": (2, 4, 300, {"l2_size": 0, "llc_size": 2 << 20}),
    "three-cpus-no-ddio-granule": (3, 3, 300, {"ddio": 0, "user_exact": 1 << 32,
                                               "user_granule": 1 << 40}),
}


def model_output(binary: Path, tmp: Path, name: str) -> str:
    seed, ncpus, phases, cfg = CASES[name]
    sites, c2c = tmp / f"{name}-sites.csv", tmp / f"{name}-c2c.csv"
    args = [f"ncpus={ncpus}", *(f"{k}={v}" for k, v in cfg.items()),
            f"sites={sites}", f"c2c={c2c}"]
    proc = subprocess.run([str(binary), *args], input=mixed_trace(seed, ncpus, phases),
                          capture_output=True, text=True, check=True)
    return (f"# counters\n{proc.stdout}# sites\n{sites.read_text()}"
            f"# c2c\n{c2c.read_text()}")


@pytest.mark.process
@pytest.mark.parametrize("name", sorted(CASES))
def test_model_output_is_unchanged_on_a_long_mixed_trace(model_trace: Path, tmp_path: Path,
                                                         name: str) -> None:
    got = model_output(model_trace, tmp_path, name)
    golden = GOLDEN / f"golden-{name}.txt"
    if os.environ.get("NETBED_REGENERATE_GOLDEN"):
        golden.write_text(got)
    want = golden.read_text()
    assert got.count("\n") > 200  # the trace reached every table
    assert got == want, (f"model output differs from {golden}; if the model's behaviour "
                         "changed on purpose, regenerate (module docstring)")


def test_the_trace_has_every_kind_of_line() -> None:
    text = mixed_trace(*CASES["two-cpus"][:3])
    assert "\nP " in text and "\nS " in text and "\nR " in text and "window" in text
