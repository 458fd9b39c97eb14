"""The payload path on a known pattern: e1000 (no checksum offload) in a micro guest,
its interrupt and so the checksum (GRO, in NAPI) on vCPU 0, the socket's queue capped
at 64 KiB so the copy follows the checksum closely, and the reader pinned to vCPU 0
(pin-same) or vCPU 1 (pin-cross). The copy should find the payload in its own private
caches in pin-same and in vCPU 0's in pin-cross (clean: the checksum only read it).
One boot per placement; `slow`: the model runs the receive at a fraction of TCG speed.
"""

from __future__ import annotations

import os
import shutil

import pytest

from testbed.formats import payloadpath as pp
from testbed.settings import Settings
from testbed.vm.cachemodel import run_payload_receive

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

MBYTES, RMEM = 4, 64 << 10


@pytest.fixture(scope="module")
def settings_() -> Settings:
    if shutil.which(Settings().qemu_binary) is None:
        pytest.skip("QEMU is not installed")
    return Settings.from_mapping({"qemu": os.environ.get("INVOKE_NETBED_QEMU")})


@pytest.mark.parametrize(("reader_cpu", "placement"), [(0, "pin-same"), (1, "pin-cross")])
def test_the_copy_finds_the_payload_where_the_checksum_left_it(settings_, tmp_path, reader_cpu,
                                                               placement):
    run = run_payload_receive(settings_, tmp_path, reader_cpu=reader_cpu, mbytes=MBYTES,
                              rmem_bytes=RMEM)
    assert run.path is not None
    rows = {r.metric: r for r in pp.tidy_rows(run.path)}
    shares = {k: rows[f"cache.payload_copy_from.{k}"].value
              for k in ("own", "peer", "llc", "memory")}
    lines = MBYTES << 20 >> 6
    print(placement, {k: round(v, 3) for k, v in shares.items()},
          {m: (round(rows[m].value, 3), rows[m].note) for m in (
              "cache.payload_lag_kb.p50", "cache.payload_lag_kb.p95",
              "cache.payload_checksum_cpu_is_copy_cpu", "cache.payload_copy_reads")},
          "first reads", run.path.first_read, "records", run.path.records,
          "device_writes", run.counts["kernel"].get("device_writes"), "payload lines", lines)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert run.path.records["pass_ranges"] > 0
    assert rows["cache.payload_copy_reads"].value > 0.8 * lines  # nearly every payload line
    assert run.path.first_read["checksum"] > 0.8 * lines  # e1000: GRO's checksum reads first
    if placement == "pin-same":
        assert shares["own"] > 0.8
        assert rows["cache.payload_checksum_cpu_is_copy_cpu"].value > 0.9
    else:
        assert shares["peer"] > 0.8
        assert rows["cache.payload_checksum_cpu_is_copy_cpu"].value < 0.1
    assert rows["cache.payload_lag_kb.p95"].value < 4 * RMEM / 1024  # a shallow queue
