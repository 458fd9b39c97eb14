"""model_trace's replay= (the model alone on a window the plugin recorded with trace=)
drives the model exactly as the text trace's P lines do, so the model-only timings it
prints are of the same work the plugin makes the model do."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_cachemodel_golden import CASES, mixed_trace

pytestmark = pytest.mark.process  # compiles C, starts processes

# model_trace_rec (cachemodel/plugin/model.h): pc, vaddr, paddr, sum0, sum1, evicted,
# cpu, mode, store, size, flags
REC = struct.Struct("<6Q4BI")
TRACE_SUMS = 1


def p_lines(trace: str) -> list[str]:
    """The P lines of a generated trace (what the plugin's vcpu_mem does)."""
    return [ln for ln in trace.splitlines()
            if (ln.split(" ", 1)[1] if ln.startswith("@") else ln).startswith("P ")]


def as_records(lines: list[str]) -> bytes:
    out = bytearray()
    for ln in lines:
        pc = 0
        if ln.startswith("@"):
            at, ln = ln.split(" ", 1)
            pc = int(at[1:], 0)
        _, cpu, mode, rw, addr, size, digest, evicted = ln.split()
        a = int(addr, 0)
        out += REC.pack(pc, a, a, int(digest), int(digest), int(evicted), int(cpu),
                        0 if mode == "k" else 1, rw == "s", int(size), TRACE_SUMS)
    return bytes(out)


def test_replay_counts_what_the_p_lines_count(model_trace: Path, tmp_path: Path) -> None:
    seed, ncpus, phases, _ = CASES["two-cpus"]
    lines = p_lines(mixed_trace(seed, ncpus, phases))
    assert len(lines) > 10000
    (tmp_path / "t.bin").write_bytes(as_records(lines))
    outs = []
    for how, extra, stdin in (("text", [], "\n".join(lines) + "\n"),
                              ("replay", [f"replay={tmp_path / 't.bin'}"], "")):
        sites = tmp_path / f"{how}-sites.csv"
        proc = subprocess.run([str(model_trace), f"ncpus={ncpus}", f"sites={sites}", *extra],
                              input=stdin, capture_output=True, text=True, check=True)
        outs.append(proc.stdout + sites.read_text())
        if how == "replay":
            assert "ns/access" in proc.stderr
    assert outs[0] == outs[1]
    assert ",l1d_misses," in outs[0]
