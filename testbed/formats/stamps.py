"""When each read of the window happened: guest monotonic stamps, raw file and alignment.

Raw file: `stamps.txt`, "<label> <nanoseconds>" lines, CLOCK_MONOTONIC of the
guest, written by the guest tool `nbsnap` (tracefs's `mono` clock is the same clock).

Every read at the window's edges is bracketed by two stamps, `<what>-start` and
`<what>`, so the moment of the read is known within their difference. The units
(the data connection's tcp_info, the NIC's statistics) define the window; every
other source (perf stat, /proc, the trace, the cache model's markers) is compared
with it and the worst distance is reported as `window.skew`. A units read also has a
`units-<edge>-sockets` stamp between its socket reads and its NIC statistics (only to
tell which part of a slow read was slow); the reader is stopped for the socket reads,
because `TCP_INFO` takes the socket lock the reader holds through every recv
(images/tools/nbsnap.c, `units`).

A read's moment is the middle of its bracket, except for the cache model's markers,
whose moments are known exactly from the plugin (cachemodel/plugin/plugin.c,
`vcpu_marker`): at `begin` the vCPU stalls while the plugin writes its "before"
snapshot and only then starts counting, so counting starts at the bracket's end;
at `end` it stops counting as the marker executes and then stalls while it writes
the snapshot and copies the attribution tables for its writer thread (6-57 ms
under TCG; 92-478 ms while it formatted them there), so counting stops at the
bracket's start. perf is not in cache-model windows (testbed.run.window says why),
so a model window's sources are the markers, the units and /proc, all read in one
nbsnap line; perf's brackets, where present, are measured like the others. The
`mark-arm` stamps (the model armed ahead of the window, testbed.run.window) are no
source's edge and take no part in the alignment.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.errors import NetbedError

RAW = "stamps.txt"
FILES = (RAW,)

# (begin label, end label) of each source; every label has a "-start" twin.
UNITS = ("units-before", "units-after")
BRACKETS: dict[str, tuple[str, str]] = {
    "perf": ("perf-begin", "perf-end"),
    "proc": ("proc-before", "proc-after"),
    "trace": ("trace-on", "trace-off"),
    "cachemodel": ("mark-begin", "mark-end"),
}


def parse_stamps(text: str) -> dict[str, int]:
    """"<label> <ns>" lines -> {label: ns}; a label seen twice keeps its first stamp."""
    out: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise NetbedError(f"{RAW} line {number}: expected '<label> <nanoseconds>', "
                              f"got {line!r}",
                              hint="the file should come from nbsnap")
        out.setdefault(parts[0], int(parts[1]))
    return out


@dataclass(frozen=True)
class Alignment:
    """The window's length and how far each source's edges lie from the units'."""

    seconds: float
    read_ms: float  # the longest units read (start to end stamp)
    offsets_ms: dict[str, float]  # source -> worst |edge - units edge|

    @property
    def skew_ms(self) -> float:
        return max([self.read_ms / 2, *self.offsets_ms.values()])

    @property
    def worst(self) -> str:
        if not self.offsets_ms or self.read_ms / 2 >= max(self.offsets_ms.values()):
            return "units read"
        return max(self.offsets_ms, key=lambda k: self.offsets_ms[k])


# source -> (begin, end) edge rule: "middle" of the bracket, or its "start" / "end"
EDGE_RULES: dict[str, tuple[str, str]] = {"cachemodel": ("end", "start")}


def _edge(stamps: dict[str, int], label: str, rule: str) -> float:
    """The moment of one edge read, in ns, by its source's rule."""
    if rule == "middle":
        return _moment(stamps, label)[0]
    return float(stamps[label] if rule == "end" else stamps.get(f"{label}-start", stamps[label]))


def _moment(stamps: dict[str, int], label: str) -> tuple[float, float]:
    """(middle, half width) of a read, in ns; an unbracketed label is a point."""
    end = stamps[label]
    start = stamps.get(f"{label}-start", end)
    return (start + end) / 2, (end - start) / 2


def alignment(stamps: dict[str, int]) -> Alignment:
    """Window length from the units' reads and each present source's distance to them."""
    missing = [lb for lb in UNITS if lb not in stamps]
    if missing:
        raise NetbedError(f"{RAW} lacks {', '.join(missing)}",
                          hint="the window script did not finish its unit reads")
    (b, bw), (e, ew) = _moment(stamps, UNITS[0]), _moment(stamps, UNITS[1])
    if e <= b:
        raise NetbedError(f"{RAW}: the window closes before it opens ({b:.0f} >= {e:.0f} ns)")
    offsets: dict[str, float] = {}
    for source, (lb_begin, lb_end) in BRACKETS.items():
        if lb_begin in stamps and lb_end in stamps:
            rule_begin, rule_end = EDGE_RULES.get(source, ("middle", "middle"))
            sb = _edge(stamps, lb_begin, rule_begin)
            se = _edge(stamps, lb_end, rule_end)
            offsets[source] = max(abs(sb - b), abs(se - e)) / 1e6
    return Alignment((e - b) / 1e9, 2 * max(bw, ew) / 1e6, offsets)
