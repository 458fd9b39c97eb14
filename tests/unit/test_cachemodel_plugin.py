"""The cache-model plugin from Python: its parameters and `-plugin` spec (testbed.vm.cachemodel,
testbed.build.cachemodel_plugin), how it is built, and the micro guests' command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.build import cachemodel_plugin as cmplugin
from testbed.build.qemu_backport import QemuInstall
from testbed.errors import ConfigError
from testbed.vm import cachemodel as cm

LINE = 64
L1D = 32 << 10


# ---------------------------------------------------------------- parameters
def test_plugin_spec_renders_qemu_72_syntax():
    spec = cm.cachemodel_plugin_spec(Path("/c/libnetbed_cache.so"), Path("/r/cachemodel.csv"),
                                     l2_size=0)
    assert spec.render() == (
        "file=/c/libnetbed_cache.so,out=/r/cachemodel.csv,l1d_size=32768,l1d_assoc=8,"
        "l2_size=0,l2_assoc=16,llc_size=8388608,llc_assoc=16,line=64,cold=on,dma=on,ddio=on,"
        "user_exact=4294967296,user_granule=1099511627776")


def test_user_granule_must_be_a_power_of_two():
    with pytest.raises(ConfigError, match="user_granule=3000 is not a power of two"):
        cm.cachemodel_plugin_spec(Path("/c/x.so"), Path("/r/c.csv"), user_granule=3000)
    assert "user_granule=0" in cm.cachemodel_plugin_spec(
        Path("/c/x.so"), Path("/r/c.csv"), user_granule=0).render()


def test_plugin_spec_refuses_commas_and_unknown_parameters():
    with pytest.raises(ConfigError, match="comma"):
        cm.cachemodel_plugin_spec(Path("/a,b/x.so"), Path("/r/c.csv"))
    with pytest.raises(ConfigError, match=r"unknown parameter.*l3_size"):
        cm.cachemodel_plugin_spec(Path("/x.so"), Path("/r/c.csv"), l3_size=1)


@pytest.mark.parametrize("bad", [dict(line=48), dict(l1d_size=48 << 10), dict(llc_assoc=0),
                                 dict(l2_size=3 << 20)])
def test_bad_geometry_names_the_parameter_and_a_fix(bad):
    with pytest.raises(ConfigError) as exc:
        cmplugin.ModelParams(**bad).validate()
    assert next(iter(bad)).split("_")[0] in str(exc.value)
    assert exc.value.hint


def test_disabled_l2_needs_no_valid_l2_geometry():
    cmplugin.ModelParams(l2_size=0, l2_assoc=0).validate()


# ---------------------------------------------------------------- build helpers
def test_sources_list_has_suite_updates_and_security():
    text = cmplugin.deb_src_sources("http://deb.debian.org/debian/", "bookworm")
    assert text.splitlines() == [
        "deb-src http://deb.debian.org/debian bookworm main",
        "deb-src http://deb.debian.org/debian bookworm-updates main",
        "deb-src http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_apt_options_keep_apt_off_the_system_configuration(tmp_path):
    opts = cmplugin.apt_source_options(tmp_path, tmp_path / "s.list")
    joined = " ".join(opts)
    assert f"Dir::Etc::SourceList={tmp_path / 's.list'}" in joined
    assert "Dir::Etc::SourceParts=/dev/null" in joined
    assert f"Dir::State::Lists={tmp_path / 'lists'}" in joined
    assert f"Dir::Cache={tmp_path / 'apt'}" in joined


GIT_PATCH = """\
From: someone
Subject: two files

diff --git a/plugins/loader.c b/plugins/loader.c
--- a/plugins/loader.c
+++ b/plugins/loader.c
@@ -1 +1 @@
-a
+b
diff --git a/include/qemu/qemu-plugin.h b/include/qemu/qemu-plugin.h
index 1..2 100644
--- a/include/qemu/qemu-plugin.h
+++ b/include/qemu/qemu-plugin.h
@@ -1 +1 @@
-x
+y
"""


def test_patch_section_extracts_only_the_header():
    section = cmplugin.patch_section(GIT_PATCH, cmplugin.HEADER_PATH)
    assert section is not None
    assert "+++ b/include/qemu/qemu-plugin.h" in section and "+y" in section
    assert "loader.c" not in section
    assert cmplugin.patch_section(GIT_PATCH, "include/other.h") is None


def test_plugin_key_changes_with_source_version_and_header():
    base = cmplugin.plugin_key({"a.c": b"1"}, b"h", "7.2", "-I/x")
    assert base != cmplugin.plugin_key({"a.c": b"2"}, b"h", "7.2", "-I/x")
    assert base != cmplugin.plugin_key({"a.c": b"1"}, b"h2", "7.2", "-I/x")
    assert base != cmplugin.plugin_key({"a.c": b"1"}, b"h", "8.0", "-I/x")
    assert base == cmplugin.plugin_key({"a.c": b"1"}, b"h", "7.2", "-I/x")


def test_micro_argv_loads_plugins_and_selects_tcg_threads():
    spec = cm.cachemodel_plugin_spec(Path("/p.so"), Path("/o.csv"))
    argv = cm.micro_argv("qemu", Path("/k"), Path("/i"), 2, "single", [spec])
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert argv[argv.index("-plugin") + 1].startswith("file=/p.so,out=/o.csv,")


# ---------------------------------------------------------------- attribution plumbing
def test_attribution_tables_are_plugin_arguments():
    spec = cm.cachemodel_plugin_spec(Path("/c/p.so"), Path("/r/c.csv"),
                                     sites_csv=Path("/r/s.csv"), c2c_csv=Path("/r/x.csv"))
    assert spec.render().startswith("file=/c/p.so,out=/r/c.csv,sites=/r/s.csv,c2c=/r/x.csv,")
    with pytest.raises(ConfigError, match="needs the sites table"):
        cm.cachemodel_plugin_spec(Path("/c/p.so"), Path("/r/c.csv"), c2c_csv=Path("/r/x.csv"))
    with pytest.raises(ConfigError, match="comma"):
        cm.cachemodel_plugin_spec(Path("/c/p.so"), Path("/r/c.csv"), sites_csv=Path("/a,b"))


def test_micro_tools_are_static_non_pie_at_addresses_of_their_own():
    cmds = [cm.tool_compile_command(Path(f"/s/{i}.c"), Path("/o"), i) for i in range(4)]
    bases = {next(a for a in c if a.startswith("-Wl,-Ttext-segment=")) for c in cmds}
    assert len(bases) == 4
    assert all("-static" in c and "-no-pie" in c for c in cmds)
    assert set(cm.guest_tool_sources()) >= {"nbmark", "nbbench_attrib"}


def test_kernel_symbols_are_read_back_from_the_console():
    import base64
    import gzip

    text = "ffffffff81000000 T _text\n"
    b64 = base64.encodebytes(gzip.compress(text.encode())).decode().replace("\n", "\r\n")
    console = f"boot noise\r\n{cm.KALLSYMS_BEGIN}\r\n{b64}{cm.KALLSYMS_END}\r\nmore\r\n"
    assert cm.console_kallsyms(console) == text
    with pytest.raises(Exception, match="no kernel symbols"):
        cm.console_kallsyms("nothing here")


def test_cpu_time_of_a_process_is_read_from_proc():
    import os

    assert cm.proc_cpu_seconds(os.getpid()) > 0
    run = cm.MicroRun("", 1.0, None, marks=(1.5, 4.0))
    assert run.marked_cpu_s() == 2.5
    with pytest.raises(Exception, match="NBCPU-MARK"):
        cm.MicroRun("", 1.0, None).marked_cpu_s()


def test_micro_argv_on_the_backport_maps_guest_ram_for_the_model():
    spec = cm.cachemodel_plugin_spec(Path("/p.so"), Path("/o.csv"))
    qemu = QemuInstall(binary="/q/qemu-system-x86_64", kind="backport")
    argv = cm.micro_argv(qemu, Path("/k"), Path("/i"), 2, "single", [spec], memory_mb=512)
    assert "memory-backend-memfd,id=netbed-ram,size=512M,share=on" in argv
    assert argv[argv.index("-plugin") + 1].endswith(",guest_ram=512M")
    system = cm.micro_argv(QemuInstall(binary="qemu-system-x86_64"), Path("/k"), Path("/i"),
                           2, "single", [spec])
    assert "-object" not in system and "guest_ram" not in " ".join(system)


def test_a_micro_guest_that_stopped_at_once_is_not_called_a_timeout():
    quick = cm.micro_failure_hint(0.4, 900)
    assert "900" not in quick and "could not load" in quick
    assert "within 900 s" in cm.micro_failure_hint(900.2, 900)
