"""Benchmark: cold kernel build and patch-only rebuild per base, as `invoke build-kernel` does them.

    python benchmarks/kernel_build.py [--base debian-6.1|debian-6.12] [--cache-dir DIR] [--keep]

With no --cache-dir, a fresh cache directory (empty ccache, no source tree), so the
first figure is a true cold build: get the base's source, extract, allnoconfig +
fragment, compile. Then patch-only rebuilds from that tree: `touch`, a one-line patch
to init/main.c made from the tree itself (so it applies to any base), and for
debian-6.1 the shipped `patched` variant (the wake-local patch, 23 C files). The
variants come from a temporary kernels file. Given an existing --cache-dir, builds
already there are reported from their metadata.json (marked `cached`) and only the
missing ones are built. Goals on 2 cores: <= 8 min cold, <= 2 min patch-only. Prints
figures; asserts nothing about time (the machine is shared).
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.build.kernel import Kernel
from testbed.build.kernel_build import ensure_built, inputs_for, tree_dir_of
from testbed.build.kernel_source import known_source
from testbed.experiment.kernelfile import DEBIAN_BASES, PATCHES_DIR, load_kernels
from testbed.settings import Settings

WAKE_LOCAL = "0001-net-optionally-wake-socket-readers-on-the-CPU-that-r.patch"
MARK = "\tpr_notice(\"%s\", linux_banner);\n"


def touch_patch(main_c: Path) -> str:
    """A one-line change to init/main.c as a -p1 patch (a comment after the banner line)."""
    old = main_c.read_text().splitlines(keepends=True)
    at = old.index(MARK) + 1 if MARK in old else len(old)
    new = [*old[:at], "\t/* netbed benchmark: patch-only rebuild */\n", *old[at:]]
    return "".join(difflib.unified_diff(old, new, "a/init/main.c", "b/init/main.c"))


def _line(label: str, k: Kernel, seconds: float, started: datetime) -> str:
    """One figure; a kernel whose metadata says it was built before `started` is cached."""
    m = k.metadata
    fresh = datetime.fromisoformat(m["built_at"]) >= started
    what = (f"{seconds:7.1f} s wall now" if fresh else
            f"cached (built {m['built_at']})")
    extra = (f", patch-only part {m['patch_only_seconds']} s"
             if "patch_only_seconds" in m else "")
    return (f"{label:<24} {what}; recorded {m['build_seconds']} s wall, "
            f"{m.get('build_cpu_seconds', '?')} s CPU{extra}  {k.release}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="debian-6.1", choices=sorted(DEBIAN_BASES))
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="cache to build in (default: a new, empty temp dir: a cold build)")
    ap.add_argument("--keep", action="store_true", help="keep a temp cache dir afterwards")
    args = ap.parse_args()
    temp = args.cache_dir is None
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="netbed-kbench-"))
    settings = Settings(cache_dir=cache)
    work = Path(tempfile.mkdtemp(prefix="netbed-kbench-file-"))
    kfile = work / "kernels.yaml"
    # named as in configs/kernels.yaml, so an existing cache's builds are found
    suffix = "" if args.base == "debian-6.1" else "-" + args.base.removeprefix("debian-")
    cold_name, touch_name = f"stock{suffix}", f"touch{suffix}"
    kfile.write_text(f"variants:\n  {cold_name}:\n    base: {args.base}\n"
                     "    localversion: \"\"\n")
    print(f"cache dir: {cache} (cpus: {os.cpu_count()}); base {args.base}")
    lines = []
    started = datetime.now(UTC).replace(microsecond=0)
    try:
        kernels = load_kernels(kfile)
        cold = kernels.variant(cold_name)
        t0 = time.monotonic()
        k = ensure_built(cold, settings, print, kernels)
        lines.append(_line("cold (unpatched)", k, time.monotonic() - t0, started))
        source = known_source(cold.base, settings)
        assert source is not None  # it was just built from it
        tree = tree_dir_of(settings, inputs_for(cold, source))
        (work / "touch.patch").write_text(touch_patch(tree / "init" / "main.c"))
        extra = (f"  {touch_name}:\n    base: {args.base}\n    patches: [touch.patch]\n"
                 "    localversion: -touch\n")
        if args.base == "debian-6.1":
            extra += (f"  patched:\n    base: {args.base}\n    patches: "
                      f"[{PATCHES_DIR / WAKE_LOCAL}]\n    localversion: -wakelocal\n")
        kfile.write_text(kfile.read_text() + extra)
        kernels = load_kernels(kfile)
        for name in [n for n in (touch_name, "patched") if n in kernels]:
            t0 = time.monotonic()
            k = ensure_built(kernels.variant(name), settings, print, kernels)
            lines.append(_line(f"patch-only ({name})", k, time.monotonic() - t0, started))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if temp and not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    print("\n".join(lines))
    print(f"load average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          "(the machine is shared; wall times include waiting for the CPU; CPU seconds are "
          "user+sys of the build's commands)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
