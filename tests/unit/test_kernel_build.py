"""testbed.build.kernel_build: config parsing/checking, cache keys, the patch file (pure),
and the build flow with a fake command runner (which way a variant is built)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.build.kernel_build import (
    COMPILED_MARKER,
    CONFIGURED_MARKER,
    FRAGMENT,
    FROM_FRESH_SOURCE,
    FROM_TREE_COPY,
    IN_TREE,
    BuildInputs,
    _Build,
    _Progress,
    build_plan,
    check_config,
    config_mismatches,
    first_failure,
    hunk_text,
    kernel_facts,
    make_argv,
    parse_config,
    parse_patch,
    touched_files,
)
from testbed.build.kernel_source import KernelSource
from testbed.build.kernels import build_order, variant_statuses
from testbed.errors import ConfigError
from testbed.experiment.kernelfile import Variant, load_kernels
from testbed.settings import Settings


def patch_paths(variant: str = "patched") -> list[Path]:
    """The patches of a shipped variant (default `patched`), in order."""
    return [ref.path for ref in load_kernels().variant(variant).patches]


def _inputs(**over: object) -> BuildInputs:
    base: dict[str, object] = dict(
        variant="stock", source_version="6.1.192-2", fragment_sha256="a" * 64,
        compiler="gcc (Debian 12.2.0-14+deb12u1) 12.2.0", patches=(),
    )
    base.update(over)
    return BuildInputs(**base)  # type: ignore[arg-type]


# ---- config fragment


def test_parse_config_reads_set_unset_and_skips_comments() -> None:
    cfg = parse_config('# a comment\n\nCONFIG_SMP=y\n# CONFIG_MODULES is not set\n'
                       'CONFIG_NR_CPUS=16\nCONFIG_LOCALVERSION="-x"\n')
    assert {k: v.value for k, v in cfg.items()} == {
        "CONFIG_SMP": "y", "CONFIG_MODULES": "n", "CONFIG_NR_CPUS": "16",
        "CONFIG_LOCALVERSION": '"-x"'}
    assert cfg["CONFIG_NR_CPUS"].line == 5


def test_parse_config_rejects_garbage_naming_file_and_line() -> None:
    with pytest.raises(ConfigError, match=r"frag.config:2: not a Kconfig line"):
        parse_config("CONFIG_SMP=y\nSMP=y\n", "frag.config")


def test_parse_config_rejects_duplicates() -> None:
    with pytest.raises(ConfigError, match=r"f:3: CONFIG_SMP set twice \(first at line 1\)"):
        parse_config("CONFIG_SMP=y\n\n# CONFIG_SMP is not set\n", "f")


def test_config_mismatches_reports_dropped_and_changed_options() -> None:
    req = parse_config("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=8\n")
    merged = parse_config("CONFIG_A=y\nCONFIG_C=y\nCONFIG_D=4\n")
    bad = {(r.name, got) for r, got in config_mismatches(req, merged)}
    assert bad == {("CONFIG_B", "n"), ("CONFIG_C", "y"), ("CONFIG_D", "4")}


def test_kernel_facts_reads_preemption_and_hz() -> None:
    facts = kernel_facts(parse_config(
        "CONFIG_PREEMPT_VOLUNTARY=y\n# CONFIG_PREEMPT is not set\nCONFIG_HZ=250\n"
        "CONFIG_NO_HZ_IDLE=y\nCONFIG_NR_CPUS=16\n"))
    assert (facts.preemption, facts.hz, facts.timer, facts.nr_cpus) == (
        "PREEMPT_VOLUNTARY", 250, "NO_HZ_IDLE", 16)


def test_shipped_fragment_has_what_the_guest_needs() -> None:
    cfg = parse_config(FRAGMENT.read_text(), str(FRAGMENT))
    must = ["SMP", "E1000", "VIRTIO_NET", "VIRTIO_PCI", "PCI_MSI", "RPS", "XPS",
            "PERF_EVENTS", "SERIAL_8250_CONSOLE", "DEVTMPFS", "BLK_DEV_INITRD", "INET",
            "UNIX", "UNIX98_PTYS", "ACPI", "KVM_GUEST", "PROC_SYSCTL", "BINFMT_SCRIPT"]
    assert [m for m in must if cfg.get(f"CONFIG_{m}", None) is None
            or cfg[f"CONFIG_{m}"].value != "y"] == []
    assert int(cfg["CONFIG_NR_CPUS"].value) >= 8
    assert cfg["CONFIG_MODULES"].value == "n"
    assert cfg["CONFIG_DEBUG_INFO"].value == "n"
    facts = kernel_facts(cfg)
    assert facts.preemption != "unknown" and facts.hz > 0


# ---- cache key


def test_key_is_stable_and_ignores_names_other_than_recipe_1_ones() -> None:
    assert _inputs().key() == _inputs().key()
    assert _inputs(variant="mine").key() == _inputs(variant="yours").key()
    # an unpatched build without a localversion is its tree's, whatever its name
    assert _inputs(variant="mine").key() == _inputs().key() == _inputs().tree().key()
    # recipe 1 did not hash patched's localversion; a patched variant of another name
    # with the same patches and localversion is a separate build
    p = (("0001.patch", "1" * 64),)
    assert _inputs(variant="mine", patches=p, localversion="-wakelocal").key() != \
        _inputs(variant="patched", patches=p, localversion="-wakelocal").key()


@pytest.mark.parametrize("field,value", [
    ("source_version", "6.1.193-1"),
    ("fragment_sha256", "b" * 64),
    ("compiler", "gcc (Debian 13.1.0) 13.1.0"),
    ("recipe", 99),
    ("base", "debian-6.12"),
    ("extra_fragment_sha256", "c" * 64),
    ("localversion", "-x"),
])
def test_key_changes_with_each_input(field: str, value: object) -> None:
    assert _inputs(**{field: value}).key() != _inputs().key()


def test_patched_key_depends_on_patch_hashes_and_stock_parent_does_not() -> None:
    p1 = _inputs(variant="patched", patches=(("0001.patch", "1" * 64),))
    p2 = _inputs(variant="patched", patches=(("0001.patch", "2" * 64),))
    assert p1.key() != p2.key()
    assert p1.key() != _inputs().key()
    assert p1.tree() == p2.tree() == _inputs()


def test_recipe_1_keys_are_kept() -> None:
    """stock and patched keys as recipe 1 computed them (before the kernels file), so a
    cache built then is still found: the fields it hashed, nothing more."""
    old = {"source_version": "6.1.192-2", "fragment_sha256": "a" * 64,
           "compiler": "gcc (Debian 12.2.0-14+deb12u1) 12.2.0", "recipe": 1,
           "base_config": "allnoconfig"}
    blob = json.dumps(old, sort_keys=True).encode()
    assert _inputs().key() == hashlib.sha256(blob).hexdigest()[:16]
    pat = {**old, "patches": [["0001.patch", "1" * 64]]}
    blob = json.dumps(pat, sort_keys=True).encode()
    assert _inputs(variant="patched", patches=(("0001.patch", "1" * 64),),
                   localversion="-wakelocal").key() == hashlib.sha256(blob).hexdigest()[:16]
    # affine-copy as its own branch keyed it before the kernels file (recipe 1)
    pat = {**old, "patches": [["0002.patch", "2" * 64]]}
    blob = json.dumps(pat, sort_keys=True).encode()
    assert _inputs(variant="affine-copy", patches=(("0002.patch", "2" * 64),),
                   localversion="-affinecopy").key() == hashlib.sha256(blob).hexdigest()[:16]
    # another localversion on the same patches is another kernel
    assert _inputs(patches=(("0001.patch", "1" * 64),), localversion="-mine").key() != \
        _inputs(patches=(("0001.patch", "1" * 64),), localversion="-wakelocal").key()


def test_tree_of_a_variant_drops_patches_and_localversion_only() -> None:
    v = _inputs(patches=(("p", "1"),), localversion="-x", base="debian-6.12",
                extra_fragment_sha256="c" * 64)
    assert v.tree() == _inputs(base="debian-6.12", extra_fragment_sha256="c" * 64)
    assert v.tree().in_tree and not v.in_tree


def test_make_argv_differs_between_variants_only_in_localversion() -> None:
    stock, patched = make_argv("", 2), make_argv("-wakelocal", 2)
    diff = [(a, b) for a, b in zip(stock, patched, strict=True) if a != b]
    assert diff == [("LOCALVERSION=", "LOCALVERSION=-wakelocal")]
    assert "CC=ccache gcc" in stock and stock[:3] == ["nice", "-n", "10"]


# ---- the patch


def test_shipped_patch_is_a_well_formed_format_patch() -> None:
    paths = patch_paths()
    assert [p.name[:5] for p in paths] == ["0001-"]
    info = parse_patch(paths[0])
    assert info.author.startswith("netbed developers")
    assert "wake" in info.subject and len(info.subject) > 20
    assert info.has_diffstat
    assert set(info.files) == {
        "include/linux/wait_current_cpu.h", "kernel/sched/fair.c", "kernel/sched/sched.h",
        "kernel/sched/wait.c", "net/core/dev.h", "net/core/sock.c",
        "net/core/sysctl_net_core.c"}
    text = paths[0].read_text()
    assert '"rx_wake_local"' in text and "WF_CURRENT_CPU" in text
    # the commit message says what it does not cover
    assert "epoll" in text.split("\n---\n", 1)[0]


def test_affine_copy_patch_is_its_own_variant_and_says_its_decisions() -> None:
    (path,) = patch_paths(variant="affine-copy")
    assert path.name.startswith("0002-") and path not in patch_paths()
    info = parse_patch(path)
    assert info.author.startswith("netbed developers") and info.has_diffstat
    assert set(info.files) == {
        "include/linux/sched/rx_affine.h", "kernel/sched/core.c", "kernel/sched/fair.c",
        "net/core/sysctl_net_core.c", "net/ipv4/tcp.c"}
    text = path.read_text()
    message = text.split("\n---\n", 1)[0]
    assert '"rx_affine_copy"' in text and "proc_do_static_key" in text
    # the description decides which CPU processed the data, and says what happens
    # with RFS and with a pinned reader
    for words in ("sk_incoming_cpu", "GRO", "RFS", "pinning", "rate-limited", "cpus_mask"):
        assert words in message, words
    assert load_kernels().variant("affine-copy").localversion == "-affinecopy"


def test_parse_patch_unfolds_subject_and_strips_prefix(tmp_path: Path) -> None:
    text = ("From abc Mon Sep 17 00:00:00 2001\nFrom: A <a@b>\n"
            "Subject: [PATCH 2/3] one two\n three\n\nbody\n---\n"
            " x | 1 +\n 1 file changed, 1 insertion(+)\n\n"
            "diff --git a/x b/x\n--- a/x\n+++ b/x\n")
    info = parse_patch(tmp_path / "p.patch", text)
    assert (info.subject, info.author, info.files, info.has_diffstat) == (
        "one two three", "A <a@b>", ("x",), True)


# ---- the functional probe's trace summariser (images/kernel/probe/wakeprobe.awk)

# In the tracefs format of Linux 6.1 (irq-info flags column); lines as captured from a
# patched guest, plus edge cases: wake 1 from softirq on CPU 1 -> switched in on 1;
# wake 2 from a task on CPU 0 -> switched in on 0; wake 3 (softirq, CPU 1) never
# followed by a switch-in; an unrelated pid; a lost-events line.
TRACE = """# tracer: nop
          <idle>-0       [001] d.s..    10.387079: sched_waking: comm=rxreader pid=61 prio=120 target_cpu=001
          <idle>-0       [001] d....    10.387134: sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=rxreader next_pid=61 next_prio=120
        rxreader-61      [001] d....    10.387181: sched_switch: prev_comm=rxreader prev_pid=61 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
            bash-70      [000] d....    10.390000: sched_waking: comm=rxreader pid=61 prio=120 target_cpu=001
          <idle>-0       [000] d....    10.390100: sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=rxreader next_pid=61 next_prio=120
      ksoftirqd/1-17      [001] dNs..    10.391000: sched_waking: comm=rxreader pid=61 prio=120 target_cpu=000
        rxreader-61      [000] d.s1.    10.392000: sched_waking: comm=kworker/0:1 pid=20 prio=120 target_cpu=000
          <idle>-0       [000] d....    10.392100: sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=kworker/0:1 next_pid=20 next_prio=120
CPU:1 [LOST 3 EVENTS]
"""  # noqa: E501


@pytest.mark.process
@pytest.mark.skipif(not shutil.which("awk"), reason="no awk on this host")
def test_wakeprobe_awk_counts_where_the_reader_was_switched_in(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    trace.write_text(TRACE)
    awk = FRAGMENT.parent / "probe" / "wakeprobe.awk"
    out = subprocess.run(["awk", "-v", "pid=61", "-v", "k=1", "-v", "wake=1", "-f", str(awk),
                          str(trace)], capture_output=True, text=True, check=True).stdout
    facts = dict(re.findall(r"(\w+)=(\S+)", out))
    assert out.startswith("WAKEPROBE ")
    assert {k: facts[k] for k in (
        "wakeups", "softirq_wakeups", "softirq_wakers_on_k", "placed", "on_k",
        "softirq_placed", "softirq_on_k", "lost", "ran_cpu0", "ran_cpu1")} == {
        "wakeups": "3", "softirq_wakeups": "2", "softirq_wakers_on_k": "2", "placed": "2",
        "on_k": "1", "softirq_placed": "1", "softirq_on_k": "1", "lost": "1",
        "ran_cpu0": "1", "ran_cpu1": "1"}


# ---- patches checked before compiling; config checked after Kconfig


def test_touched_files_reads_both_sides_and_skips_dev_null() -> None:
    text = ("--- /dev/null\n+++ b/include/new.h\n@@ -0,0 +1 @@\n+x\n"
            "--- a/net/core/dev.c\t2024-01-01\n+++ b/net/core/dev.c\n")
    assert touched_files(text) == ("include/new.h", "net/core/dev.c")
    assert set(touched_files(patch_paths()[0].read_text())) == set(
        parse_patch(patch_paths()[0]).files)


PATCH = """\
From: A <a@b>
Subject: [PATCH] two files

---
diff --git a/a.c b/a.c
--- a/a.c
+++ b/a.c
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
diff --git a/b.c b/b.c
--- a/b.c
+++ b/b.c
@@ -1,3 +1,3 @@
 alpha
-beta
+BETA
 gamma
@@ -5,2 +5,2 @@
 epsilon
-zeta
+ZETA
--
2.39.2
"""


def test_hunk_text_finds_the_nth_hunk_of_a_file() -> None:
    assert hunk_text(PATCH, "b.c", 2) == (21, "@@ -5,2 +5,2 @@\n epsilon\n-zeta\n+ZETA")
    assert hunk_text(PATCH, "b.c", 3) == (0, "")


def test_first_failure_names_file_hunk_and_patch_line() -> None:
    out = ("patching file a.c\npatching file b.c\nHunk #2 FAILED at 5.\n"
           "1 out of 2 hunks FAILED -- saving rejects to file b.c.rej\n")
    assert first_failure(out, PATCH) == (
        "b.c: hunk #2 (patch line 21) FAILED (expected near line 5 of the source):\n"
        "@@ -5,2 +5,2 @@\n epsilon\n-zeta\n+ZETA")
    assert first_failure("can't find file to patch at input line 5\nPerhaps you used the "
                         "wrong -p\n", PATCH) == "can't find file to patch at input line 5"
    assert first_failure("", PATCH) == "patch failed without saying why"


def _variant(tmp_path: Path, patches: str, config: str = "") -> Variant:
    (tmp_path / "k.yaml").write_text(f"variants:\n  v:\n    patches: [{patches}]\n" + (
        f"    config: {config}\n" if config else ""))
    return load_kernels(tmp_path / "k.yaml").variant("v")


@pytest.mark.process
@pytest.mark.skipif(shutil.which("patch") is None, reason="patch is not installed")
def test_a_patch_that_does_not_apply_is_refused_before_compiling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.c").write_text("one\ntwo\nthree\n")
    (tree / "b.c").write_text("alpha\nbeta\ngamma\ndelta\nepsilon\nzeta-changed\n")
    (tmp_path / "p.patch").write_text(PATCH)
    variant = _variant(tmp_path, "p.patch")
    build = _Build(Settings(cache_dir=tmp_path / "cache"), lambda m: None)
    source = KernelSource("debian-6.1", "debian", "6.1.1-1", package="linux-source-6.1")
    with pytest.raises(ConfigError) as info:
        build.check_patches(variant, tree, source)
    assert info.value.message == (
        "k.yaml:3:15: kernel v: p.patch does not apply to debian-6.1 (linux-source-6.1 "
        "6.1.1-1): b.c: hunk #2 (patch line 21) FAILED (expected near line 5 of the "
        "source):\n@@ -5,2 +5,2 @@\n epsilon\n-zeta\n+ZETA")
    # the tree itself is untouched, and the check leaves nothing behind
    assert (tree / "a.c").read_text() == "one\ntwo\nthree\n"
    assert list((tmp_path / "cache" / "kernels" / "tmp").iterdir()) == []
    (tree / "b.c").write_text("alpha\nbeta\ngamma\ndelta\nepsilon\nzeta\n")
    build.check_patches(variant, tree, source)  # now it applies
    # a context line that differs: patch's default fuzz would take it; we do not
    (tree / "a.c").write_text("one-changed\ntwo\nthree\n")
    with pytest.raises(ConfigError, match=r"a.c: hunk #1 \(patch line 8\) FAILED"):
        build.check_patches(variant, tree, source)


def test_options_kconfig_dropped_are_refused_naming_fragment_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "extra.config").write_text("CONFIG_NEW_THING=y\n# CONFIG_SMP is not set\n")
    variant = _variant(tmp_path, "", "extra.config")
    merged = FRAGMENT.read_text().replace("CONFIG_SMP=y", "# CONFIG_SMP is not set")
    (tmp_path / ".config").write_text(merged)
    source = KernelSource("debian-6.1", "debian", "6.1.1-1", package="linux-source-6.1")
    with pytest.raises(ConfigError) as info:
        check_config(variant, tmp_path / ".config", source)
    # the variant's fragment turned SMP off (that it kept); NEW_THING does not exist
    assert info.value.message.splitlines() == [
        "k.yaml:2:3: kernel v: Kconfig of linux-source-6.1 6.1.1-1 did not keep requested "
        "options:",
        f"  {tmp_path}/extra.config:1: CONFIG_NEW_THING=y ended up n"]


def test_build_order_puts_unpatched_variants_first(tmp_path: Path) -> None:
    kernels = load_kernels()
    assert [v.name for v in build_order(["all"], kernels)][:2] == ["stock", "stock-6.12"]
    assert [v.name for v in build_order(["patched", "stock"], kernels)] == ["stock", "patched"]
    with pytest.raises(ConfigError, match="unknown kernel 'nope'"):
        build_order(["nope"], kernels)


@pytest.mark.process  # the compiler's version is part of a key: `gcc --version`
def test_doctor_lists_every_variant_built_or_not(tmp_path: Path) -> None:
    (tmp_path / "linux.tar.xz").write_bytes(b"not really a tarball")
    (tmp_path / "k.yaml").write_text("variants:\n  new: {base: debian-6.12}\n"
                                     "  local: {base: ./linux.tar.xz}\n")
    rows = variant_statuses(Settings(cache_dir=tmp_path / "cache"),
                            load_kernels(tmp_path / "k.yaml"))
    assert [(r.name, r.base, r.patches, r.built) for r in rows] == [
        ("new", "debian-6.12", 0, None), ("local", "./linux.tar.xz", 0, False)]
    assert rows[0].text().endswith("source not fetched yet")
    assert rows[1].text().endswith("not built")


# ---- the build's flow: which way a variant is built, with a fake command runner


def test_build_plan_compiles_an_unpatched_tree_only_for_an_unpatched_variant() -> None:
    stock = _inputs()
    patched = _inputs(variant="patched", patches=(("0001.patch", "1" * 64),),
                      localversion="-wakelocal")
    only_lv = _inputs(variant="lv", localversion="-x")  # no patches, a release of its own
    assert [build_plan(stock, c) for c in (False, True)] == [IN_TREE, IN_TREE]
    assert [build_plan(patched, c) for c in (False, True)] == [FROM_FRESH_SOURCE,
                                                               FROM_TREE_COPY]
    assert [build_plan(only_lv, c) for c in (False, True)] == [FROM_FRESH_SOURCE,
                                                               FROM_TREE_COPY]


SOURCE_FILES = {"a.c": "one\ntwo\nthree\n",
                "b.c": "alpha\nbeta\ngamma\ndelta\nepsilon\nzeta\n"}


@dataclass
class FakeMake:
    """Stands in for _Progress.run: tar, Kconfig, cp and make do in a few files what they
    would in a kernel tree (patch runs for real); every command is recorded with its
    directory."""

    source: dict[str, str]
    calls: list[tuple[str, Path]] = field(default_factory=list)
    compiled: list[dict[str, str]] = field(default_factory=list)  # the sources make saw

    def run(self, progress: _Progress, cmd: list[str], cwd: Path,
            env: dict[str, str] | None = None) -> None:
        what = cmd[0] if cmd[0] != "nice" else "make " + cmd[-1]
        self.calls.append((what if what != "make" else f"make {cmd[-1]}", cwd))
        if cmd[0] == "tar":
            for rel, text in self.source.items():
                (cwd / rel).write_text(text)
        elif cmd[0].endswith("merge_config.sh"):
            (cwd / ".config").write_text(FRAGMENT.read_text())
        elif cmd[0] == "cp":
            shutil.copytree(cmd[-2], cmd[-1], symlinks=True)
        elif cmd[0] == "patch":
            subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
        elif cmd[-1] == "bzImage":
            self.compiled.append({rel: (cwd / rel).read_text() for rel in self.source})
            (cwd / "arch/x86/boot").mkdir(parents=True, exist_ok=True)
            (cwd / "arch/x86/boot/bzImage").write_bytes(b"kernel of " + cwd.name.encode())
            (cwd / "include/config").mkdir(parents=True, exist_ok=True)
            localversion = next(a for a in cmd if a.startswith("LOCALVERSION="))
            (cwd / "include/config/kernel.release").write_text(
                "6.1.1-netbed" + localversion.split("=", 1)[1] + "\n")


@pytest.fixture
def fake_make(monkeypatch: pytest.MonkeyPatch) -> FakeMake:
    fake = FakeMake(dict(SOURCE_FILES))
    monkeypatch.setattr(_Progress, "run", lambda self, cmd, cwd, env=None:
                        fake.run(self, cmd, cwd, env))
    return fake


def _flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patch: str = PATCH
          ) -> tuple[_Build, KernelSource, Variant, BuildInputs, Variant, BuildInputs]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.patch").write_text(patch)
    variant = _variant(tmp_path, "p.patch")
    stock = load_kernels().variant("stock")
    build = _Build(Settings(cache_dir=tmp_path / "cache"), lambda m: None, jobs=2)
    build.clean_tmp()
    source = KernelSource("debian-6.1", "debian", "6.1.1-1", tarball=tmp_path / "linux.tar.xz",
                          package="linux-source-6.1")
    v_inputs = _inputs(variant="v", patches=(("p.patch", hashlib.sha256(
        patch.encode()).hexdigest()),), localversion="-v")
    return build, source, variant, v_inputs, stock, _inputs()


@pytest.mark.process  # `patch` applies the patch for real
@pytest.mark.skipif(shutil.which("patch") is None, reason="patch is not installed")
def test_a_patched_variant_without_a_compiled_tree_compiles_once_from_fresh_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_make: FakeMake) -> None:
    build, source, variant, inputs, stock, stock_inputs = _flow(tmp_path, monkeypatch)
    kernel = build.build(variant, inputs, source)
    # one compile, of the patched sources, in the variant's own work dir; no tree copy
    assert [c for c, _ in fake_make.calls] == [
        "tar", "make allnoconfig", "scripts/kconfig/merge_config.sh", "make olddefconfig",
        "make bzImage"]
    work = fake_make.calls[-1][1]
    assert work.parent == build.tmp and work.name.startswith(f"v-tree-{inputs.key()}.")
    assert fake_make.compiled == [{"a.c": "one\nTWO\nthree\n",
                                   "b.c": "alpha\nBETA\ngamma\ndelta\nepsilon\nZETA\n"}]
    # published as before: same key, same fields; built_from says how
    assert kernel.bzimage == build.artifact_dir(inputs) / "bzImage"
    assert kernel.release == "6.1.1-netbed-v"
    meta = kernel.metadata
    assert meta["cache_key"] == inputs.key() and meta["built_from"] == "fresh source + patches"
    assert [p["file"] for p in meta["patches"]] == ["p.patch"]
    assert meta["config_sha256"] == hashlib.sha256(FRAGMENT.read_bytes()).hexdigest()
    assert "patch_only_seconds" not in meta and meta["build_cpu_seconds"] >= 0
    # no tree of the base was made: the unpatched build comes later, cold, and works
    assert not build.tree_dir(inputs).exists() and not build.tree_compiled(inputs)
    fake_make.calls.clear()
    stock_kernel = build.build(stock, stock_inputs, source)
    assert [c for c, _ in fake_make.calls] == [
        "tar", "make allnoconfig", "scripts/kconfig/merge_config.sh", "make olddefconfig",
        "make bzImage"]
    assert fake_make.calls[-1][1] == build.tree_dir(inputs)
    assert fake_make.compiled[-1] == SOURCE_FILES  # the tree is unpatched
    assert stock_kernel.release == "6.1.1-netbed"
    assert stock_kernel.metadata["built_from"] == "fresh source tree"
    assert (build.tree_dir(inputs) / COMPILED_MARKER).is_file()
    assert (build.tree_dir(inputs) / CONFIGURED_MARKER).is_file()


@pytest.mark.process
@pytest.mark.skipif(shutil.which("patch") is None, reason="patch is not installed")
def test_a_patched_variant_with_a_compiled_tree_recompiles_a_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_make: FakeMake) -> None:
    build, source, variant, inputs, stock, stock_inputs = _flow(tmp_path, monkeypatch)
    build.build(stock, stock_inputs, source)
    fake_make.calls.clear()
    kernel = build.build(variant, inputs, source)
    assert [c for c, _ in fake_make.calls] == ["cp", "patch", "make bzImage"]
    assert fake_make.calls[-1][1].parent == build.tmp
    assert fake_make.compiled[-1]["b.c"].endswith("ZETA\n")
    assert (build.tree_dir(inputs) / "b.c").read_text() == SOURCE_FILES["b.c"]  # untouched
    assert kernel.metadata["built_from"] == f"tree {stock_inputs.key()} + patches"
    assert "patch_only_seconds" in kernel.metadata


@pytest.mark.process
@pytest.mark.skipif(shutil.which("patch") is None, reason="patch is not installed")
def test_a_fresh_source_build_refuses_a_patch_before_compiling_and_publishes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_make: FakeMake) -> None:
    build, source, variant, inputs, _, _ = _flow(tmp_path, monkeypatch)
    fake_make.source["b.c"] = "alpha\nbeta\ngamma\ndelta\nepsilon\nzeta-changed\n"
    with pytest.raises(ConfigError) as info:
        build.build(variant, inputs, source)
    assert info.value.message.startswith(
        "k.yaml:3:15: kernel v: p.patch does not apply to debian-6.1 (linux-source-6.1 "
        "6.1.1-1): b.c: hunk #2 (patch line 21) FAILED")
    assert "make bzImage" not in [c for c, _ in fake_make.calls]
    assert not build.artifact_dir(inputs).exists() and build.load(inputs) is None
    # the half-done work dir is in tmp/ only, and the next build removes it, saying so
    said: list[str] = []
    _Build(build.settings, said.append).clean_tmp()
    assert list(build.tmp.iterdir()) == [] and "removing the work folders" in said[0]
