"""The stock and patched kernels: the patch applies, both build and boot, the patch works.

Opt-in tier (`slow`): the first run builds both kernels (minutes on 2 cores; later
runs hit the cache). Boots use a tiny busybox initramfs of our own, so these tests
depend only on the kernel, not on the guest image.

The functional test measures where the blocking reader REALLY ran after each
wake-up, from the kernel's own sched_wakeup/sched_switch tracepoints (tracefs), with
the NIC interrupt pinned to CPU k and data arriving over the NIC from the host
(QEMU user networking, hostfwd). The fraction with the sysctl at 0 is printed too.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.build.kernel import Kernel
from testbed.build.kernel_build import (
    SOURCE_PACKAGE,
    SOURCE_TARBALL,
    ensure_built,
    parse_patch,
    source_version,
)
from testbed.build.newc import CpioEntry, write_newc
from testbed.errors import ConfigError
from testbed.experiment.kernelfile import KernelSet, load_kernels
from testbed.settings import IMAGES_DIR, Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

PROBE_DIR = IMAGES_DIR / "kernel" / "probe"
BUSYBOX = Path("/bin/busybox")
IRQ_CPU = 1  # not CPU 0, so "the default CPU" and "the IRQ CPU" differ
SEND_BYTES = 48 << 20

TINY_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
echo "TINY uname=$(uname -r)"
echo "TINY cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "TINY drivers=$(for d in /sys/class/net/*/device/driver; do basename $(readlink $d); done \
    | sort | tr '\\n' ,)"
if [ -e /proc/sys/net/core/rx_wake_local ]; then
  echo "TINY rx_wake_local=$(cat /proc/sys/net/core/rx_wake_local)"
else
  echo "TINY rx_wake_local=absent"
fi
[ -c /dev/ptmx ] && echo "TINY ptmx=yes"
grep -q tracefs /proc/filesystems && echo "TINY tracefs=yes"
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    netbed.probe=*) PROBE=${arg#netbed.probe=} ;;
    netbed.dump=*) DUMP=${arg#netbed.dump=} ;;
  esac
done
if [ -n "${PROBE:-}" ]; then
  IFACE=$(ls /sys/class/net | grep -v lo | head -1)
  ip link set lo up
  ip link set "$IFACE" up
  ip addr add 10.0.2.15/24 dev "$IFACE"
  K=${PROBE%%:*} WAKE=${PROBE#*:}
  /probe/wakeprobe.sh "$K" "$WAKE" 5001 "$IFACE" "${DUMP:-0}"
fi
echo TINY-END
poweroff -f
"""


def patch_paths() -> list[Path]:
    """The patches of the shipped `patched` variant (configs/kernels.yaml), in order."""
    return [ref.path for ref in load_kernels().variant("patched").patches]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="module")
def tiny_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox + our /init + the probe (static rxreader, wakeprobe.sh) as a newc cpio."""
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    work = tmp_path_factory.mktemp("tiny")
    reader = work / "rxreader"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(reader),
                    str(PROBE_DIR / "rxreader.c")], check=True)
    entries = [CpioEntry.directory(d) for d in
               ("bin", "dev", "proc", "sys", "tmp", "probe", "sys/kernel")]
    entries += [
        CpioEntry.file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        CpioEntry.file("init", TINY_INIT.encode(), 0o755),
        CpioEntry.file("probe/rxreader", reader.read_bytes(), 0o755),
        CpioEntry.file("probe/wakeprobe.sh", (PROBE_DIR / "wakeprobe.sh").read_bytes(), 0o755),
        CpioEntry.file("probe/wakeprobe.awk", (PROBE_DIR / "wakeprobe.awk").read_bytes()),
    ]
    out = work / "tiny.cpio"
    write_newc(out, entries)
    return out


@pytest.fixture(scope="module")
def kernels(settings: Settings) -> dict[str, Kernel]:
    return {v: ensure_built(v, settings) for v in ("stock", "patched")}


@dataclass
class TinyBoot:
    console: str
    facts: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _facts(console: str) -> dict[str, str]:
    """key=value pairs of the TINY and WAKEPROBE lines the guest printed."""
    facts: dict[str, str] = {}
    for line in console.splitlines():
        if line.startswith(("TINY ", "WAKEPROBE ", "rxreader: bytes=")):
            facts.update(re.findall(r"(\w+)=(\S*)", line))
    return facts


def boot_tiny(kernel: Kernel, initrd: Path, workdir: Path, *, cpus: int = 2,
              probe: str | None = None, send_bytes: int = 0, dump: int = 0,
              timeout: float = 300.0) -> TinyBoot:
    """Boot `kernel` with the tiny initramfs under TCG until it powers off.

    With `probe` ("K:WAKE") the guest runs wakeprobe.sh on its e1000 and we send
    `send_bytes` to its reader from the host through a hostfwd port.
    """
    port = _free_port()
    tag = kernel.name + (f"-probe{probe.replace(':', '-')}" if probe else "")
    console = workdir / f"console-{tag}.log"
    console.unlink(missing_ok=True)
    append = "console=ttyS0 panic=-1 loglevel=4" + (f" netbed.probe={probe}" if probe else "")
    if dump:
        append += f" netbed.dump={dump}"
    argv = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
        "-m", "512", "-smp", str(cpus),
        "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{console}",
        "-kernel", str(kernel.bzimage), "-initrd", str(initrd), "-append", append,
        "-nic", "none",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:5001",
        "-device", "e1000,netdev=n0",
    ]
    if probe is None:
        argv += ["-netdev", "user,id=n1,restrict=on", "-device", "virtio-net-pci,netdev=n1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    sent = False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            text = console.read_text(errors="replace") if console.exists() else ""
            if probe and not sent and "WAKEPROBE-LISTENING" in text:
                with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                    chunk = b"x" * (1 << 16)
                    for _ in range(send_bytes // len(chunk)):
                        s.sendall(chunk)
                sent = True
        if proc.poll() is None:
            pytest.fail(f"guest did not power off within {timeout:.0f} s; console: {console}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = console.read_text(errors="replace")
    if "TINY-END" not in text:
        pytest.fail(f"guest did not finish its init; console: {console}\n{text[-3000:]}")
    return TinyBoot(text, _facts(text))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("kernel-boot")


# ---------------------------------------------------------------- tests


def test_patch_applies_cleanly_to_the_recorded_source(tmp_path: Path) -> None:
    if not SOURCE_TARBALL.exists() or not shutil.which("patch"):
        pytest.skip(f"{SOURCE_PACKAGE} or patch not installed")
    version = source_version()
    for path in patch_paths():
        files = [f for f in parse_patch(path).files
                 if not f.startswith("include/linux/wait_current_cpu.h")]
        subprocess.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(tmp_path),
                        "--strip-components=1",
                        *(f"linux-source-6.1/{f}" for f in files)], check=True)
        proc = subprocess.run(["patch", "--dry-run", "-p1", "-i", str(path)], cwd=tmp_path,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{path.name} on {SOURCE_PACKAGE} {version}:\n" \
            + proc.stdout + proc.stderr
        assert "offset" not in proc.stdout and "fuzz" not in proc.stdout, proc.stdout


def test_metadata_records_source_config_and_patches(kernels: dict[str, Kernel]) -> None:
    stock, patched = kernels["stock"].metadata, kernels["patched"].metadata
    assert stock["source_version"] == patched["source_version"] == source_version()
    assert stock["config_fragment_sha256"] == patched["config_fragment_sha256"]
    assert stock["compiler"] == patched["compiler"]
    assert stock["patches"] == []
    assert [p["file"] for p in patched["patches"]] == [p.name for p in patch_paths()]
    assert (stock["base"], patched["base"]) == ("debian-6.1", "debian-6.1")
    assert (stock["localversion"], patched["localversion"]) == ("", "-wakelocal")
    assert stock["preemption"] == "PREEMPT_VOLUNTARY" and stock["hz"] == 250
    # same config apart from nothing: the variants differ only by the patch
    assert stock["config_sha256"] == patched["config_sha256"]
    print(f"\nbuild seconds: stock {stock['build_seconds']}, patched {patched['build_seconds']}")


@pytest.mark.parametrize("variant", ["stock", "patched"])
def test_kernel_boots_with_builtin_nics_and_sysctl_only_when_patched(
        variant: str, kernels: dict[str, Kernel], tiny_initrd: Path, workdir: Path) -> None:
    kernel = kernels[variant]
    boot = boot_tiny(kernel, tiny_initrd, workdir, cpus=2)
    f = boot.facts
    assert f["uname"] == kernel.release
    assert f["cpus"] == "2", "ACPI/SMP must bring up QEMU's -smp CPUs"
    assert f["drivers"] == "e1000,virtio_net,"
    assert f.get("ptmx") == "yes" and f.get("tracefs") == "yes"
    assert f["rx_wake_local"] == ("0" if variant == "patched" else "absent")


def _check_setup(f: dict[str, str]) -> None:
    """The experiment is only valid if the wakers really ran in softirq on the IRQ CPU."""
    wakeups, soft, soft_k = (int(f[k]) for k in
                             ("wakeups", "softirq_wakeups", "softirq_wakers_on_k"))
    assert soft >= 0.9 * wakeups, f"most wake-ups should come from softirq: {f}"
    assert soft_k >= 0.9 * soft, f"the NIC IRQ pinning to CPU {IRQ_CPU} did not hold: {f}"
    assert f["lost"] == "0", f"trace events were lost: {f}"


def _probe(kernel: Kernel, initrd: Path, workdir: Path, wake: int) -> dict[str, str]:
    boot = boot_tiny(kernel, initrd, workdir, cpus=2, probe=f"{IRQ_CPU}:{wake}",
                     send_bytes=SEND_BYTES)
    f = boot.facts
    assert "placed" in f, f"no WAKEPROBE summary:\n{boot.console[-3000:]}"
    assert int(f["bytes"]) == SEND_BYTES, "the reader must have read everything we sent"
    placed, on_k = int(f["placed"]), int(f["on_k"])
    assert placed >= 50, f"too few wake-ups to judge: {f}"
    _check_setup(f)
    frac = on_k / placed
    print(f"\n{kernel.name} rx_wake_local={wake}: reader switched in on the IRQ CPU "
          f"{IRQ_CPU} after {on_k}/{placed} = {frac:.1%} of its wake-ups "
          f"(softirq wake-ups: {f['softirq_on_k']}/{f['softirq_placed']}); {f}")
    return f


def test_wake_local_runs_reader_on_the_irq_cpu(
        kernels: dict[str, Kernel], tiny_initrd: Path, workdir: Path) -> None:
    off = _probe(kernels["patched"], tiny_initrd, workdir, 0)
    on = _probe(kernels["patched"], tiny_initrd, workdir, 1)
    frac_on = int(on["on_k"]) / int(on["placed"])
    frac_off = int(off["on_k"]) / int(off["placed"])
    print(f"\nfraction on IRQ CPU: rx_wake_local=1 {frac_on:.1%}, =0 {frac_off:.1%}")
    assert frac_on >= 0.90


# ---------------------------------------------------------------- two guests


def _two_guest_probe(wake: int, workdir: Path, settings: Settings) -> dict[str, str]:
    """Receiver (2 vCPUs, e1000 data NIC, IRQ on CPU k) + sender guest, via testbed.vm.topology."""
    from testbed.vm.dataplane import RECEIVER_IP
    from testbed.vm.topology import boot, prepare_assets

    reader = workdir / "rxreader"
    if not reader.exists():
        subprocess.run(["gcc", "-O2", "-static", "-o", str(reader),
                        str(PROBE_DIR / "rxreader.c")], check=True)
    assets = prepare_assets(settings, "patched", workdir / f"wake{wake}", accel="tcg")
    with boot(assets, settings, workdir / f"wake{wake}" / "guests", cpus=2, nic="e1000",
              with_sender=True, sender_cpus=1) as topo:
        rx, tx = topo.receiver.ssh, topo.sender_shell
        assert rx.run("uname -r").stdout.strip() == assets.kernel.release
        rx.run("mkdir -p /tmp/probe")
        rx.put(reader, "/tmp/probe/rxreader")
        rx.put(PROBE_DIR / "wakeprobe.sh", "/tmp/probe/wakeprobe.sh")
        rx.put(PROBE_DIR / "wakeprobe.awk", "/tmp/probe/wakeprobe.awk")
        rx.run("chmod +x /tmp/probe/rxreader /tmp/probe/wakeprobe.sh")
        rx.run(f"nohup /tmp/probe/wakeprobe.sh {IRQ_CPU} {wake} 5001 "
               f"$(cat /run/netbed-data-iface) > /tmp/wakeprobe.out 2>&1 &")
        deadline = time.monotonic() + 60
        while "WAKEPROBE-LISTENING" not in (out := rx.run("cat /tmp/wakeprobe.out").stdout):
            assert "WAKEPROBE-ERROR" not in out and time.monotonic() < deadline, out
            time.sleep(1)
        tx.run(f"bash -c 'head -c {SEND_BYTES} /dev/zero > /dev/tcp/{RECEIVER_IP}/5001'",
               timeout=600)
        deadline = time.monotonic() + 120
        while "WAKEPROBE " not in (out := rx.run("cat /tmp/wakeprobe.out").stdout):
            assert time.monotonic() < deadline, out
            time.sleep(1)
    facts = _facts(out)
    assert int(facts["bytes"]) == SEND_BYTES, out
    return facts


def test_wake_local_two_guests(kernels: dict[str, Kernel], workdir: Path,
                               settings: Settings) -> None:
    """The issue's setup: data from another guest over the data plane (needs the image)."""
    fractions = {}
    for wake in (0, 1):
        f = _two_guest_probe(wake, workdir, settings)
        placed, on_k = int(f["placed"]), int(f["on_k"])
        assert placed >= 50, f
        _check_setup(f)
        fractions[wake] = on_k / placed
        print(f"\ntwo guests, patched, rx_wake_local={wake}: reader switched in on IRQ CPU "
              f"{IRQ_CPU} after {on_k}/{placed} = {fractions[wake]:.1%} of wake-ups; {f}")
    assert fractions[1] >= 0.90


# ---------------------------------------------------------------- a user's own variant

# A trivial patch a user might drop in: one line at boot, before anything else runs
# (pr_err, so the tiny boot's loglevel=4 shows it on the console).
USER_PATCH = (Path(__file__).resolve().parent.parent / "fixtures" / "kernel"
              / "user-variant.patch").read_text()


def _user_kernels(tmp_path: Path, patch: str, name: str = "mine") -> KernelSet:
    (tmp_path / "mine.patch").write_text(patch)
    (tmp_path / "kernels.yaml").write_text(
        f"variants:\n  {name}:\n    base: debian-6.1\n    patches: [mine.patch]\n"
        f"    localversion: -{name}\n")
    return load_kernels(tmp_path / "kernels.yaml")


def test_a_user_variant_builds_from_the_shared_tree_boots_and_says_its_name(
        tmp_path: Path, settings: Settings, tiny_initrd: Path, workdir: Path) -> None:
    """Three steps of docs/kernels.md: a patch file, a variant naming it, a build by name;
    the build starts from the stock tree (patch-only) and the kernel boots as itself."""
    kernels = _user_kernels(tmp_path, USER_PATCH)
    stock = ensure_built("stock", settings)
    kernel = ensure_built("mine", settings, print, kernels)
    meta = kernel.metadata
    assert kernel.release == stock.release + "-mine"
    assert meta["base"] == "debian-6.1" and meta["localversion"] == "-mine"
    assert meta["patches"][0]["file"] == "mine.patch"
    assert len(meta["patches"][0]["sha256"]) == 64
    assert meta["source_version"] == stock.metadata["source_version"]
    assert meta["config_sha256"] == stock.metadata["config_sha256"]
    # patch-only, from the stock build's tree (a cached build recorded the same)
    assert meta["built_from"] == f"tree {stock.metadata['cache_key']} + patches"
    print(f"\nuser variant: {kernel.release}, build {meta['build_seconds']} s wall, "
          f"{meta['build_cpu_seconds']} s CPU, patch-only part "
          f"{meta.get('patch_only_seconds', 'n/a')} s")
    boot = boot_tiny(kernel, tiny_initrd, workdir, cpus=2)
    assert boot.facts["uname"] == kernel.release
    assert "netbed-user-variant: this kernel carries a user's patch" in boot.console
    assert boot.facts["rx_wake_local"] == "absent"  # not the wake-local patch


def test_a_patch_that_does_not_apply_to_the_base_is_refused_with_its_hunk(
        tmp_path: Path, settings: Settings) -> None:
    """Refused before compiling, naming the kernels file line and the failing hunk; no
    artifact appears."""
    ensure_built("stock", settings)  # the tree exists: the check is a matter of seconds
    # one context line that is not in the source: GNU patch would apply it with fuzz 2;
    # netbed applies without fuzz and refuses it
    bad = USER_PATCH.replace("page_address_init();", "page_address_init_v2();")
    kernels = _user_kernels(tmp_path, bad, name="broken")
    with pytest.raises(ConfigError) as info:
        ensure_built("broken", settings, print, kernels)
    message = info.value.message
    assert "kernels.yaml:4:15: kernel broken: mine.patch does not apply to debian-6.1" in message
    assert "init/main.c: hunk #1 (patch line 3) FAILED" in message
    assert "+\tpr_err(\"netbed-user-variant" in message
    assert not list((settings.cache_dir / "kernels").glob("broken-*/metadata.json"))


def test_the_6_12_base_builds_and_boots_with_the_same_config(
        settings: Settings, tiny_initrd: Path, workdir: Path) -> None:
    """stock-6.12 (bookworm-backports' linux-source-6.12, fetched into the cache): the
    netbed.config options all survive its Kconfig, and it boots with the built-in NICs."""
    kernel = ensure_built("stock-6.12", settings)
    assert kernel.release.startswith("6.12.") and kernel.release.endswith("-netbed")
    assert kernel.metadata["source_package"] == "linux-source-6.12"
    assert kernel.metadata["source_suite"] == "bookworm-backports"
    boot = boot_tiny(kernel, tiny_initrd, workdir, cpus=2)
    f = boot.facts
    assert f["uname"] == kernel.release
    assert f["cpus"] == "2" and f["drivers"] == "e1000,virtio_net,"
    assert f.get("ptmx") == "yes" and f.get("tracefs") == "yes"
    assert f["rx_wake_local"] == "absent"
