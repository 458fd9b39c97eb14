"""Where the reader ran: the guest-side sampler command, its raw file and its parser.

Raw file: `reader-cpus.txt`, "<seconds> <cpu>" lines (nbsample, or the shell loop).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from testbed.errors import NetbedError

RAW = "reader-cpus.txt"  # "<seconds> <cpu>" samples
RAW_ERRORS = "sampler.err"  # the sampler's stderr
RAW_PID = "reader-pid.txt"  # the reader's pid (netserver's data process)
FILES = (RAW, RAW_ERRORS, RAW_PID)

# --------------------------------------------------------------------------- reader location


def reader_sampler_command(duration: float, interval: float = 0.1,
                           queue_file: str | None = None) -> str:
    """A bash loop sampling the CPU (field 39 of /proc/<pid>/stat) of netserver's
    data process, the newest child of the netserver daemon, into "<t> <cpu>" lines.

    `t` is /proc/uptime (seconds, guest clock; the window is counted in
    centiseconds because shells have no floats). Every round is fork-free: the
    pause is `read -t` on a FIFO nobody writes (no `sleep` process) and pgrep
    runs only until the data process is found. Under TCG with netperf saturating
    both vCPUs, a loop that forked `sleep` and pgrep each round got one sample
    per second instead of ten. Samples before the data process exists are
    skipped; "# pid N" lines record which process was sampled. Needs bash,
    pgrep (procps) and mkfifo/mktemp (coreutils): no awk.

    `queue_file`: nbsample also samples the reader's socket queues into it
    (testbed.formats.sockqueue); the bash fallback does not (no such file then).
    """
    if duration <= 0 or interval <= 0:
        raise NetbedError("reader sampler needs positive duration and interval")
    script = f"""\
f=$(mktemp -u) && mkfifo "$f" && exec 9<>"$f" && rm -f "$f" || exit 1
cs() {{ read -r up _ < /proc/uptime; now=$(( ${{up%.*}} * 100 + 1${{up#*.}} - 100 )); }}
findpid() {{ d=$(pgrep -o -x netserver) && pid=$(pgrep -n -x -P "$d" netserver) || pid=; }}
cs; end=$(( now + {round(duration * 100)} )); pid=; last=
while :; do
  cs
  [ "$now" -ge "$end" ] && break
  if [ -z "$pid" ] || ! read -r s < /proc/"$pid"/stat; then
    findpid
    [ -n "$pid" ] && read -r s < /proc/"$pid"/stat || pid=
  fi 2>/dev/null
  if [ -n "$pid" ]; then
    [ "$pid" != "$last" ] && echo "# pid $pid" && last=$pid
    s=${{s##*) }}
    set -- $s
    echo "$up ${{37}}"
  fi
  read -r -t {interval:g} -u 9 _
done"""
    fallback = f"bash -c {shlex.quote(script)}"
    # nbsample (images/tools/nbsample.c, in every guest image) prints the same lines
    # without forking, so it keeps the asked rate where this loop manages 2-8 Hz.
    return (f"if command -v nbsample >/dev/null 2>&1; then "
            f"nbsample {duration:g} {interval:g}"
            + (f" {shlex.quote(queue_file)}" if queue_file else "")
            + f"; else {fallback}; fi")


@dataclass(frozen=True)
class ReaderSamples:
    """Where the reader ran: samples per CPU and their share.

    `ignored` counts lines that are not samples (the runner may capture the
    sampler's stderr into the same file); `first_ignored` shows one of them.
    """

    counts: dict[str, int]
    pids: list[int] = field(default_factory=list)
    ignored: int = 0
    first_ignored: str = ""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def shares(self) -> dict[str, float]:
        total = self.total
        return {cpu: n / total for cpu, n in sorted(self.counts.items())} if total else {}


_SAMPLE_RE = re.compile(r"^\d+(\.\d+)?\s+(\d+)$")


def parse_reader_samples(text: str) -> ReaderSamples:
    """"<seconds> <cpu>" lines and "# pid N" markers; anything else is counted, not fatal."""
    counts: dict[str, int] = {}
    pids: list[int] = []
    ignored, first = 0, ""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = re.match(r"#\s*pid\s+(\d+)", line)
            if m:
                pids.append(int(m.group(1)))
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            ignored += 1
            first = first or line[:200]
            continue
        counts[m.group(2)] = counts.get(m.group(2), 0) + 1
    return ReaderSamples(counts, pids, ignored, first)


