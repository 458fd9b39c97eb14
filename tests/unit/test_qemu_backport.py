"""The backport QEMU step: apt commands, apt's plan, the launch description, selection."""

from pathlib import Path

import pytest

from testbed.build import cachemodel_plugin
from testbed.build import qemu_backport as qb
from testbed.build.cachemodel_plugin import deb_src_lines, plugin_api_version
from testbed.errors import CommandError, ConfigError, NetbedError
from testbed.progress import Log
from testbed.settings import Settings
from testbed.vm.hostfacts import plugin_api_row
from testbed.vm.qemu import DirectBoot, direct_boot_argv

# `apt-get -s -t bookworm-backports install qemu-system-x86=...` on this host, trimmed.
SIMULATION = """\
Reading package lists...
The following packages will be upgraded:
  qemu-system-common qemu-system-data qemu-system-x86 seabios
Inst qemu-system-x86 [1:7.2+dfsg-7+deb12u18+b3] (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian \
Backports:oldstable-backports [amd64]) []
Inst seabios [1.16.2-1] (1.16.3-2~bpo12+1 Debian Backports:oldstable-backports [all])
Inst libcapstone4 (4.0.2-5 Debian:12.11/oldstable [amd64])
Conf qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
Conf seabios (1.16.3-2~bpo12+1 Debian Backports:oldstable-backports [all])
"""


def test_simulation_lists_upgrades_and_new_libraries_once():
    assert qb.parse_simulation(SIMULATION) == [
        ("qemu-system-x86", "1:10.0.2+ds-2+deb13u1~bpo12+1"),
        ("seabios", "1.16.3-2~bpo12+1"),
        ("libcapstone4", "4.0.2-5"),
    ]


def test_apt_is_pointed_at_our_sources_and_dirs_only(tmp_path):
    opts = qb.apt_options(tmp_path, tmp_path / "s.list")
    joined = " ".join(opts)
    assert f"Dir::Etc::SourceList={tmp_path / 's.list'}" in joined
    assert "Dir::Etc::SourceParts=/dev/null" in joined
    assert f"Dir::State::Lists={tmp_path / 'lists'}" in joined
    assert f"Dir::Cache::Archives={tmp_path / 'archives'}" in joined
    # the host's dpkg status stays the reference: never redirected
    assert "Dir::State::status" not in joined
    sim = qb.simulate_command(opts, "1:10.0")
    assert sim[:1] == ["apt-get"] and "-s" in sim and "install" in sim
    assert sim[sim.index("-t") + 1] == "bookworm-backports"
    assert sim[-1] == "qemu-system-x86=1:10.0"
    dl = qb.download_command(opts, [("seabios", "1.16.3")])
    assert dl[-2:] == ["download", "seabios=1.16.3"]


def test_sources_carry_the_base_suite_for_dependencies_and_the_backports():
    lines = qb.binary_sources("http://deb.debian.org/debian/", "bookworm").splitlines()
    assert lines == ["deb http://deb.debian.org/debian bookworm main",
                     "deb http://deb.debian.org/debian bookworm-updates main",
                     "deb http://deb.debian.org/debian-security bookworm-security main",
                     "deb http://deb.debian.org/debian bookworm-backports main"]
    assert deb_src_lines("http://m/debian", ["bookworm-backports"]) == \
        "deb-src http://m/debian bookworm-backports main\n"


def test_launch_sets_firmware_modules_and_libraries_and_keeps_the_pid(tmp_path):
    root = tmp_path / "root"
    inst = qb.launch_description(root, "1:10.0.2", [root / "usr/lib/x86_64-linux-gnu"])
    head = inst.argv_head()
    # env(1) execs QEMU: the process started is QEMU's pid, as process.py expects
    assert head[0] == "env"
    assert f"QEMU_MODULE_DIR={root}/usr/lib/x86_64-linux-gnu/qemu" in head
    assert f"LD_LIBRARY_PATH={root}/usr/lib/x86_64-linux-gnu" in head
    binary = head.index(str(root / "usr/bin/qemu-system-x86_64"))
    assert [head[i + 1] for i, a in enumerate(head) if a == "-L"] == [
        str(root / d) for d in qb.FIRMWARE_SUBDIRS]
    assert binary < head.index("-L")
    no_libs = qb.launch_description(root, "1:10.0.2", [])
    assert not any(a.startswith("LD_LIBRARY_PATH") for a in no_libs.argv_head())


def test_argv_builder_takes_either_a_binary_or_an_install(tmp_path):
    boot = DirectBoot(name="g", kernel=Path("/k"), initrd=Path("/i"), append="x", cpus=1,
                      memory_mb=256, accel="tcg")
    assert direct_boot_argv(boot, "qemu-system-x86_64")[:2] == ["qemu-system-x86_64", "-name"]
    inst = qb.launch_description(tmp_path, "1:10", [])
    argv = direct_boot_argv(boot, inst)
    assert argv[:len(inst.argv_head())] == inst.argv_head()
    assert argv[argv.index("-name") + 1] == "g"


def test_manifest_round_trips(tmp_path):
    m = qb.Manifest("1:10", "bookworm-backports",
                    (qb.DebFile("seabios", "1.16.3", "seabios_1.16.3_all.deb", "ab" * 32),))
    assert qb.Manifest.from_json(m.to_json()) == m


def test_backport_is_found_only_when_its_manifest_was_written(tmp_path):
    s = Settings(cache_dir=tmp_path, qemu="backport")
    dest = qb.install_dir(tmp_path, qb.BACKPORT_VERSION)
    (dest / "root").mkdir(parents=True)
    assert qb.load_backport(s) is None and qb.known_qemu(s) is None
    (dest / qb.MANIFEST).write_text(qb.Manifest(qb.BACKPORT_VERSION, "x").to_json())
    found = qb.resolve_qemu(s)  # no fetch: the manifest is there
    assert found.kind == "backport" and found.binary.startswith(str(dest))
    assert ":" not in dest.name


def test_backport_is_the_default_and_system_uses_qemu_binary():
    assert Settings().qemu == "backport" and Settings.from_mapping({}).qemu == "backport"
    s = Settings(qemu_binary="/opt/q", qemu="system")
    assert qb.resolve_qemu(s, fetch=_never).argv_head() == ["/opt/q"]
    with pytest.raises(ConfigError):
        qb.resolve_qemu(Settings(qemu="mine"), fetch=_never)
    with pytest.raises(ConfigError):
        Settings.from_mapping({"qemu": "mine"})
    assert Settings.from_mapping({"qemu": "system"}).qemu == "system"


def _never(settings: Settings, log: Log) -> qb.QemuInstall:
    raise AssertionError("no download was expected")


class FakeFetch:
    """The download as a callable: counts calls, then returns an install or raises."""

    def __init__(self, result: qb.QemuInstall | Exception) -> None:
        self.result = result
        self.calls = 0

    def __call__(self, settings: Settings, log: Log) -> qb.QemuInstall:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def _unreachable() -> qb.BackportUnavailable:
    """What ensure_backport raises when apt cannot reach the mirror."""
    cause = CommandError(["apt-get", "-o", "Dir::Etc::SourceList=/x", "-q", "update"], 100,
                         "Err:1 http://deb.debian.org/debian bookworm InRelease\n"
                         "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/"
                         "InRelease  Could not resolve 'deb.debian.org'")
    try:
        raise qb.BackportUnavailable(f"QEMU x could not be fetched: {cause}") from cause
    except qb.BackportUnavailable as exc:
        return exc


def test_unreachable_download_falls_back_to_the_system_qemu_in_one_line(tmp_path):
    s = Settings(cache_dir=tmp_path, qemu="backport", qemu_binary="/usr/bin/q")
    fetch, said = FakeFetch(_unreachable()), []
    got = qb.resolve_qemu(s, said.append, fetch)
    assert got.kind == "system" and got.argv_head() == ["/usr/bin/q"]
    assert got.fallback == ("apt-get exit 100: E: Failed to fetch http://deb.debian.org/debian/"
                            "dists/bookworm/InRelease  Could not resolve 'deb.debian.org'")
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith(f"QEMU {qb.BACKPORT_VERSION} (bookworm-backports, the default) "
                              "could not be downloaded (apt-get exit 100: E: Failed to fetch")
    assert "using the host's QEMU instead (/usr/bin/q" in said[0]
    # the run keeps that QEMU: no second download, no second line, every boot the same
    assert qb.resolve_qemu(s, said.append, fetch) == got
    assert fetch.calls == 1 and len(said) == 1
    assert qb.known_qemu(s) == got
    # another cache folder decides for itself
    other = FakeFetch(qb.launch_description(tmp_path / "r", "1:10", []))
    assert qb.resolve_qemu(Settings(cache_dir=tmp_path / "b", qemu="backport"), said.append,
                           other).kind == "backport"
    assert other.calls == 1 and len(said) == 1


def test_a_fetched_backport_is_used_and_nothing_is_said(tmp_path):
    inst = qb.launch_description(tmp_path / "root", "1:10", [])
    said: list[str] = []
    s = Settings(cache_dir=tmp_path, qemu="backport")
    assert qb.resolve_qemu(s, said.append, FakeFetch(inst)) == inst
    assert inst.fallback == "" and said == []


def test_a_backport_that_unpacked_but_fails_is_an_error_not_a_fallback(tmp_path):
    broken = CommandError(["env", "qemu-system-x86_64", "--version"], 127, "libfoo.so: not found")
    with pytest.raises(CommandError):
        qb.resolve_qemu(Settings(cache_dir=tmp_path, qemu="backport"), print, FakeFetch(broken))


def test_short_reason_keeps_one_line():
    assert qb.short_reason(NetbedError("apt plans no QEMU package\nmore", hint="h")) == \
        "apt plans no QEMU package"
    assert qb.short_reason(CommandError(["apt-get", "download"], 1)) == "apt-get exit 1"


def test_the_plugin_is_built_for_the_qemu_the_run_resolved(tmp_path, monkeypatch):
    monkeypatch.setattr(cachemodel_plugin, "installed_qemu_source",
                        lambda: ("qemu", "1:7.2+dfsg-7"))
    s = Settings(cache_dir=tmp_path, qemu="backport")
    backport = qb.launch_description(tmp_path / "r", qb.BACKPORT_VERSION, [])
    assert cachemodel_plugin.qemu_source(s, backport).version == qb.BACKPORT_VERSION
    fell_back = qb.system_qemu(s, fallback="apt-get exit 100")
    assert cachemodel_plugin.qemu_source(s, fell_back).version == "1:7.2+dfsg-7"
    # without a resolved QEMU (doctor): the selection, as far as known without a download
    assert cachemodel_plugin.qemu_source(s).version == qb.BACKPORT_VERSION


def test_plugin_api_version_from_the_header():
    assert plugin_api_version("/* x */\n#define QEMU_PLUGIN_VERSION 4\n") == 4
    assert plugin_api_version("no version here") is None
    assert plugin_api_row(4, "d").startswith("4 (>= 2")
    assert plugin_api_row(1, "d").startswith("1 (< 2")
    assert plugin_api_row(None, "unknown: why") == "unknown: why"


def test_an_update_that_reached_no_mirror_is_named_by_apts_warning():
    # apt-get update exits 0 when the mirror is unreachable; only its output says so
    out = ("Err:1 http://127.0.0.1:9/debian bookworm InRelease\n"
           "  Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)\n"
           "Reading package lists...\n"
           "W: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/InRelease  Could not "
           "connect to 127.0.0.1:9 (127.0.0.1)\n"
           "W: Some index files failed to download. They have been ignored, or old ones used "
           "instead.\n")
    assert qb.update_problem(out, ["lock", "partial"]) == (
        "W: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/InRelease  Could not "
        "connect to 127.0.0.1:9 (127.0.0.1)")
    # stdout alone (the W: lines went to stderr): the Err: line and apt's reason under it
    assert qb.update_problem(out.split("Reading")[0], []) == (
        "Err:1 http://127.0.0.1:9/debian bookworm InRelease: Could not connect to 127.0.0.1:9 "
        "(127.0.0.1). - connect (111: Connection refused)")
    assert qb.update_problem("", []) == "apt-get update fetched no index of bookworm-backports"
    fetched = ["deb.debian.org_debian_dists_bookworm-backports_InRelease",
               "deb.debian.org_debian_dists_bookworm_InRelease"]
    assert qb.update_problem(out, fetched) is None
    assert qb.update_problem(out, ["deb.debian.org_debian_dists_bookworm_InRelease"]) is not None
