"""Benchmark: where a cold guest-kernel build spends its CPU seconds, per directory.

    python -m benchmarks.kernel_profile [--fragment FILE] [--workdir DIR] [--keep]
    python -m benchmarks.kernel_profile --parse DIR     # the tables of an earlier run

Builds the stock kernel as `invoke build-kernel` does (Debian's linux-source-6.1,
`allnoconfig` + the fragment, `make bzImage`) in a scratch directory, without ccache,
with every compiler call run under GNU time (`CC=<wrapper>`): each object's user+sys
CPU seconds (the compiler and its cc1/as) go to `cc-times.txt`. Prints the CPU seconds
per phase (extract, configure, compile, the rest of make: objtool, links, kallsyms,
compression), per directory and the costliest objects, so a config change is judged by
what it saves. Needs the machine's cores for the whole build (about 6 min on 2): run it
under the host's lock; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.build.kernel_build import (
    BASE_CONFIG,
    FRAGMENT,
    SOURCE_TARBALL,
    config_mismatches,
    parse_config,
)

TIMES = "cc-times.txt"
PHASES = "phases.txt"
WRAPPER = """#!/bin/sh
exec /usr/bin/time -a -o {log} -f '%e %U %S %C' gcc "$@"
"""
_TIMED = re.compile(r"^(\d+\.\d+) (\d+\.\d+) (\d+\.\d+) (.*)$")


@dataclass(frozen=True)
class Compile:
    """One compiler call: what it produced and what it cost."""

    target: str  # the -o argument, relative to the tree ("(check)" for a probe compile)
    wall: float
    cpu: float


def parse_times(text: str) -> list[Compile]:
    """cc-times.txt (GNU time's `%e %U %S %C` lines) into compiles (pure)."""
    out = []
    for line in text.splitlines():
        if not (m := _TIMED.match(line)):
            continue
        args = m.group(4).split()
        target = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "-o"), "")
        if "-E" in args and "/ccache/" in target:
            target = "(ccache preprocess)"
        elif not target or target.startswith("/dev/null") or target == "-":
            target = "(check)"
        out.append(Compile(target, float(m.group(1)),
                           float(m.group(2)) + float(m.group(3))))
    return out


def directory_of(target: str, depth: int) -> str:
    """`drivers/acpi/acpica/x.o` at depth 2 -> `drivers/acpi` (pure)."""
    parts = target.split("/")[:-1]
    return "/".join(parts[:depth]) or "(top)"


@dataclass(frozen=True)
class DirCost:
    directory: str
    objects: int
    cpu: float


def by_directory(compiles: Sequence[Compile], depth: int) -> list[DirCost]:
    """CPU seconds and object counts per directory, costliest first (pure)."""
    cpu: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for c in compiles:
        d = c.target if c.target.startswith("(") else directory_of(c.target, depth)
        cpu[d] += c.cpu
        count[d] += 1
    return sorted((DirCost(d, count[d], cpu[d]) for d in cpu), key=lambda x: -x.cpu)


def table(compiles: Sequence[Compile], depth: int, top: int) -> str:
    total = sum(c.cpu for c in compiles) or 1.0
    rows = [f"{'directory':<28} {'objects':>7} {'CPU-s':>8} {'share':>6}"]
    for d in by_directory(compiles, depth)[:top]:
        rows.append(f"{d.directory:<28} {d.objects:7d} {d.cpu:8.1f} {100 * d.cpu / total:5.1f}%")
    return "\n".join(rows)


def costliest(compiles: Sequence[Compile], top: int) -> str:
    rows = [f"{'object':<48} {'CPU-s':>6}"]
    for c in sorted(compiles, key=lambda x: -x.cpu)[:top]:
        rows.append(f"{c.target:<48} {c.cpu:6.1f}")
    return "\n".join(rows)


# ---------------------------------------------------------------- effects


def _timed(cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run `cmd` (output to `log`); its wall seconds and user+sys CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        subprocess.run(list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                       check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (time.monotonic() - start,
            after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def build(work: Path, fragment: Path, jobs: int, ccache: bool, depend: bool) -> None:
    """Extract, configure and build in `work/tree`, writing cc-times.txt and phases.txt.
    `ccache`: compile through an empty ccache, as netbed's cold build does (its
    preprocessor runs are timed too; `depend`: in depend mode, which runs none); otherwise
    no ccache at all."""
    tree = work / "tree"
    tree.mkdir(parents=True)
    env = {**os.environ, "LC_ALL": "C"}
    env.pop("CCACHE_DEPEND", None)  # ccache refuses "0": only its presence is asked for
    if ccache:
        env["CCACHE_DIR"] = str(work / "ccache")
        if depend:
            env["CCACHE_DEPEND"] = "1"
    else:
        env["CCACHE_DISABLE"] = "1"
    wrapper = work / "cc-timed"
    wrapper.write_text(WRAPPER.format(log=work / TIMES))
    wrapper.chmod(0o755)
    cc = f"ccache {wrapper}" if ccache else str(wrapper)
    log = work / "build.log"
    phases: list[tuple[str, float, float]] = []
    load = [os.getloadavg()[0]]
    phases.append(("extract", *_timed(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(tree),
                                       "--strip-components=1"], tree, env, log)))
    cfg = [_timed(["make", BASE_CONFIG], tree, env, log),
           _timed(["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)], tree,
                  env, log),
           _timed(["make", "olddefconfig"], tree, env, log)]
    phases.append(("configure", sum(w for w, _ in cfg), sum(c for _, c in cfg)))
    bad = config_mismatches(parse_config(fragment.read_text(), str(fragment)),
                            parse_config((tree / ".config").read_text()))
    if bad:
        raise SystemExit("Kconfig did not keep: " + "; ".join(
            f"{fragment}:{r.line}: {r.name}={r.value} -> {got}" for r, got in bad))
    load.append(os.getloadavg()[0])
    phases.append(("make bzImage", *_timed(
        ["make", f"-j{jobs}", f"CC={cc}", "KBUILD_BUILD_USER=netbed",
         "KBUILD_BUILD_HOST=netbed", "bzImage"], tree, env, log)))
    load.append(os.getloadavg()[0])
    size = (tree / "arch/x86/boot/bzImage").stat().st_size
    (work / PHASES).write_text("".join(f"{n}\t{w:.1f}\t{c:.1f}\n" for n, w, c in phases)
                               + f"load\t{' '.join(f'{x:.2f}' for x in load)}\n"
                               + f"bzImage\t{size}\n")


def report(work: Path, top: int) -> str:
    compiles = parse_times((work / TIMES).read_text())
    lines = []
    phases = [ln.split("\t") for ln in (work / PHASES).read_text().splitlines()]
    cc = sum(c.cpu for c in compiles)
    for name, *vals in phases:
        if name == "load":
            lines.append(f"1-min load average (start, after configure, end): {vals[0]}")
        elif name == "bzImage":
            lines.append(f"bzImage: {int(vals[0]) / 2**20:.2f} MiB")
        else:
            lines.append(f"{name:<14} wall {float(vals[0]):7.1f} s   CPU {float(vals[1]):7.1f} s")
            if name == "make bzImage":
                lines.append(f"  of which the compiler ({len(compiles)} calls): {cc:.1f} CPU-s; "
                             f"the rest of make (objtool, links, kallsyms, gzip, scripts): "
                             f"{float(vals[1]) - cc:.1f} CPU-s")
    lines += ["", table(compiles, 1, 20), "", table(compiles, 2, 40), "",
              costliest(compiles, top)]
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fragment", type=Path, default=FRAGMENT,
                    help=f"config fragment merged onto {BASE_CONFIG} (default: {FRAGMENT})")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="empty scratch directory (default: a new temporary directory)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="make -j")
    ap.add_argument("--top", type=int, default=25, help="costliest objects to list")
    ap.add_argument("--keep", action="store_true", help="keep the logs (not the tree)")
    ap.add_argument("--ccache", action="store_true",
                    help="compile through an empty ccache, as netbed's cold build does")
    ap.add_argument("--depend", action="store_true",
                    help="with --ccache: ccache's depend mode (CCACHE_DEPEND=1)")
    ap.add_argument("--parse", type=Path, default=None, metavar="DIR",
                    help="print the tables of an earlier --keep run; build nothing")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.parse:
        print(report(args.parse, args.top))
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="netbed-kprofile-"))
    if work.exists() and any(work.iterdir()):
        ap.error(f"{work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    try:
        build(work, args.fragment.resolve(), args.jobs, args.ccache, args.depend)
        print(report(work, args.top))
    finally:
        if args.keep:
            shutil.rmtree(work / "tree", ignore_errors=True)  # 1+ GB; the logs stay
            print(f"kept: {work} (python -m benchmarks.kernel_profile --parse {work})",
                  file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
