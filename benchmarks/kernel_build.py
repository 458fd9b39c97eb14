"""Benchmark: cold kernel build and patch-only rebuild, as `invoke build-kernel` does them.

    python benchmarks/kernel_build.py [--cache-dir DIR] [--keep]

Uses a fresh cache directory (empty ccache, no source tree), so the first figure is
a true cold build: extract the Debian source, allnoconfig + fragment, compile. The
second is the patched variant built from the stock tree's objects (copy + patch +
incremental make). Goals on 2 cores: <= 8 min cold, <= 2 min patch-only. Prints
figures; asserts nothing about time (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.build.kernel_build import ensure_built
from testbed.settings import Settings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="empty directory to build in (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the cache dir afterwards")
    args = ap.parse_args()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="netbed-kbench-"))
    if cache.exists() and any(cache.iterdir()):
        ap.error(f"{cache} is not empty: a cold build needs an empty cache dir")
    settings = Settings(cache_dir=cache)
    print(f"cache dir: {cache} (cpus: {os.cpu_count()})")
    try:
        t0 = time.monotonic()
        stock = ensure_built("stock", settings, print)
        t1 = time.monotonic()
        patched = ensure_built("patched", settings, print)
        t2 = time.monotonic()
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"cold stock build:      {t1 - t0:7.1f} s  (goal <= 480 s)  {stock.release}")
    print(f"patch-only rebuild:    {t2 - t1:7.1f} s  (goal <= 120 s)  {patched.release}")
    print(f"recorded build_seconds: stock {stock.metadata['build_seconds']}, "
          f"patched {patched.metadata['build_seconds']}")
    cpu_s, cpu_p = (k.metadata["build_cpu_seconds"] for k in (stock, patched))
    jobs = os.cpu_count() or 1
    print(f"CPU seconds (user+sys): stock {cpu_s}, patched {cpu_p}; on an idle machine with "
          f"{jobs} cores that is >= {cpu_s / jobs:.0f} s and {cpu_p / jobs:.0f} s of wall time")
    print(f"load average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          "(the machine is shared; wall times above include waiting for the CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
