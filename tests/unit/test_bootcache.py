"""testbed.run.bootcache: one boot per run of equal keys; invalidation stops the guests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from testbed.run.bootcache import BootCache


def test_reuse_while_the_key_holds_and_stop_before_booting_others():
    events: list[str] = []

    @contextlib.contextmanager
    def boot(cell: str) -> Iterator[str]:
        events.append(f"up {cell}")
        yield f"guests for {cell}"
        events.append(f"down {cell}")

    with BootCache(boot, key=lambda cell: cell[0]) as cache:
        assert cache.get("a1") == "guests for a1"
        assert cache.get("a2") == "guests for a1"  # same key: reused
        assert cache.get("b1") == "guests for b1"
        cache.invalidate()
        assert cache.get("b2") == "guests for b2"  # invalidated: booted again
        assert cache.boots == 3
    assert events == ["up a1", "down a1", "up b1", "down b1", "up b2", "down b2"]


def test_a_boot_that_fails_leaves_nothing_current():
    calls = []

    @contextlib.contextmanager
    def boot(cell: str) -> Iterator[str]:
        calls.append(cell)
        if len(calls) == 1:
            raise OSError("qemu would not start")
        yield cell

    cache: BootCache[str, str] = BootCache(boot, key=lambda cell: cell)
    with contextlib.suppress(OSError):
        cache.get("a")
    assert cache.get("a") == "a" and calls == ["a", "a"]
