"""The affine-copy kernel's known effect (issue #26, item 4), measured from tracepoints.

IRQ on CPU 0, reader free, TCP_STREAM, e1000, 2 vCPUs, GRO on, one boot of the
`affine-copy` kernel, two cells run through the runner's own code (policy applied and
read back, window script, raw files fetched, collated like any run):

- `affine-copy` (net.core.rx_affine_copy=1): the reader is moved to, and kept on, the
  CPU whose softirq processes its data, so at least 0.9 of the received bytes are
  processed on the reader's CPU, and the reader moves at most a few times a second;
- `pin-irq` (the same placement knobs, the sysctl 0): the scheduler keeps the reader
  mostly off the busy softirq CPU, clearly lower.

And the two cases the patch must leave alone, the sysctl on in both (test-only
policies added to a copy of the shipped file):
- the reader pinned to CPU 1 (pin-cross): pinning wins, it is never moved;
- RFS on: RFS moves the processing to the reader, the patch stands back, and the two
  do not chase each other (processing on the reader's CPU, no stopper-driven moves).

Skipped with the reason when the kernel is not built (`invoke build-kernel --variant
affine-copy`). The figures measured are in docs/affine-copy.md.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from analysis.collate import collate_rep
from testbed.build.kernel_build import SOURCE_PACKAGE, SOURCE_TARBALL, parse_patch
from testbed.experiment.kernelfile import load_kernels
from testbed.experiment.load import experiment_from_dict
from testbed.experiment.matrix import expand
from testbed.experiment.policies import load_policies
from testbed.run.folder import RunDir
from testbed.run.repetition import BootState, discover, run_repetition
from testbed.settings import Settings
from testbed.vm.topology import Topology, boot, prepare_assets

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

POLICIES = Path(__file__).resolve().parents[2] / "configs" / "policies.yaml"
KERNEL = "affine-copy"
DURATION_S = 4
# "at most a few times a second": the patch itself moves a reader onto a CPU at most
# 4 times a second (HZ/4); anything above that is the scheduler fighting the hold
MAX_MIGRATIONS_PER_S = 4.0


def test_patch_applies_alone_and_after_wake_local(tmp_path: Path) -> None:
    """0002 applies to the recorded source exactly (no offset, no fuzz) on its own, and
    still applies on top of 0001: the two patches touch disjoint lines."""
    if not SOURCE_TARBALL.exists() or not shutil.which("patch"):
        pytest.skip(f"{SOURCE_PACKAGE} or patch not installed")
    kernels = load_kernels()
    (mine,) = [ref.path for ref in kernels.variant(KERNEL).patches]
    (wake_local,) = [ref.path for ref in kernels.variant("patched").patches]
    new = {"include/linux/wait_current_cpu.h", "include/linux/sched/rx_affine.h"}
    files = sorted({f for p in (mine, wake_local) for f in parse_patch(p).files} - new)
    both, alone = tmp_path / "both", tmp_path / "alone"
    both.mkdir()
    subprocess.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(both),
                    "--strip-components=1", *(f"linux-source-6.1/{f}" for f in files)],
                   check=True)
    shutil.copytree(both, alone)

    def apply(tree: Path, patch: Path) -> str:
        proc = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)],
                              cwd=tree, capture_output=True, text=True)
        assert proc.returncode == 0, f"{patch.name}:\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    out = apply(alone, mine)
    assert "offset" not in out and "fuzz" not in out, out
    apply(both, wake_local)
    apply(both, mine)


Booted = tuple[Topology, BootState]


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    settings = Settings()
    if not any((settings.cache_dir / "kernels").glob(f"{KERNEL}-*/metadata.json")):
        pytest.skip(f"the {KERNEL} kernel is not built "
                    f"(invoke build-kernel --variant {KERNEL}; a patch-only rebuild of stock)")
    tmp = tmp_path_factory.mktemp(KERNEL)
    assets = prepare_assets(settings, KERNEL, tmp / "assets")
    with boot(assets, settings, tmp / "guests", cpus=2, nic="e1000", with_sender=True) as topo:
        yield topo, discover(topo.receiver.ssh, topo.receiver.spec.data_mac)


EXTRA_POLICIES = """
  affine-copy-pinned:
    description: test only; pin-cross with net.core.rx_affine_copy=1 (pinning must win)
    min_cpus: 2
    irq_cpus: 0
    reader_cpu: other
    sysctls:
      net.core.rx_affine_copy: 1

  affine-copy-rfs:
    description: test only; rfs with net.core.rx_affine_copy=1 (the patch stands back)
    min_cpus: 2
    irq_cpus: 0
    reader_cpu: any
    rps_cpus: all
    rps_sock_flow_entries: 32768
    rps_flow_cnt: 32768
    sysctls:
      net.core.rx_affine_copy: 1
"""


def measure(b: Booted, tmp: Path, policy: str) -> pd.DataFrame:
    policies = tmp / "policies.yaml"
    policies.write_text(POLICIES.read_text() + EXTRA_POLICIES)
    data = {"name": "affine-copy", "axes": {"kernel": [KERNEL], "nic": ["e1000"], "cpus": [2],
                                            "policy": [policy], "workload": ["TCP_STREAM"],
                                            "gro": ["on"]},
            "repetitions": 1, "duration": DURATION_S, "warmup": 1}
    exp = experiment_from_dict(data, load_policies(policies))
    cell = expand(exp)[0]
    run = RunDir(tmp / f"run-{policy}")
    rep = run.start_rep(cell.cell_id, 1)
    topo = b[0]
    run_repetition(topo.receiver.ssh, topo.sender_shell, b[1], exp, cell,
                   exp.policies.resolve(policy, 2), rep, pmu=False)
    run.mark_done(rep, {})
    rows, _ = collate_rep(rep)
    df = pd.DataFrame(rows)
    return df[df["cpu"] == "all"].set_index("metric")


SHOWN = ("locality.processing_on_reader_cpu", "locality.irq_on_reader_cpu",
         "sched.reader_migrations", "sched.reader_migrations.per_s", "wakeups.count",
         "window.seconds", "window.throughput")


def show(df: pd.DataFrame) -> str:
    return ", ".join(f"{m}={df.loc[m, 'value']:.3f} ({df.loc[m, 'note']})" for m in SHOWN)


@pytest.mark.slow
def test_reader_follows_the_cpu_that_processes_its_data(affine: Booted, tmp_path: Path) -> None:
    on = measure(affine, tmp_path, "affine-copy")
    off = measure(affine, tmp_path, "pin-irq")
    print("\non: ", show(on), "\noff:", show(off))
    for df in (on, off):
        for m in ("locality.processing_on_reader_cpu", "sched.reader_migrations.per_s"):
            assert df.loc[m, "status"] == "ok", (m, df.loc[m, "note"])
    assert on.loc["locality.processing_on_reader_cpu", "value"] >= 0.9
    assert on.loc["sched.reader_migrations.per_s", "value"] <= MAX_MIGRATIONS_PER_S
    # "clearly lower": the stock scheduler keeps a free reader mostly off the IRQ CPU
    assert off.loc["locality.processing_on_reader_cpu", "value"] <= 0.7


def stopper_moves(tmp: Path, policy: str) -> int:
    """The reader's migrations done by a stopper thread (`migration/N` in the raw trace):
    the patch's moves (or active balancing), as opposed to wake-up placements."""
    (raw,) = (tmp / f"run-{policy}").glob("cells/*/rep-1/trace.txt.gz")
    text = gzip.decompress(raw.read_bytes()).decode(errors="replace")
    return len(re.findall(r"^\s*migration/\d+-\d+ .*sched_migrate_task: comm=netserver", text,
                          re.M))


@pytest.mark.slow
def test_pinning_wins_and_rfs_is_not_chased(affine: Booted, tmp_path: Path) -> None:
    pinned = measure(affine, tmp_path, "affine-copy-pinned")
    rfs = measure(affine, tmp_path, "affine-copy-rfs")
    print("\npinned:", show(pinned), "\nrfs:   ", show(rfs))
    for df in (pinned, rfs):
        for m in ("locality.processing_on_reader_cpu", "sched.reader_migrations.per_s"):
            assert df.loc[m, "status"] == "ok", (m, df.loc[m, "note"])
    # pinned to CPU 1 (the policy read-back checked it): never moved to the IRQ CPU 0
    assert pinned.loc["sched.reader_migrations", "value"] == 0
    assert pinned.loc["locality.processing_on_reader_cpu", "value"] <= 0.1
    # RFS puts the processing where the reader runs; the patch does not move the reader:
    # its migrations (measured: 23 in 4.1 s) are all the scheduler's wake-up placements,
    # none by the stopper
    assert rfs.loc["locality.processing_on_reader_cpu", "value"] >= 0.8
    assert stopper_moves(tmp_path, "affine-copy-rfs") == 0
