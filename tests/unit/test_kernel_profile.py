"""benchmarks.kernel_profile: GNU time's lines of a build into CPU seconds per directory."""

from __future__ import annotations

from benchmarks.kernel_profile import Compile, by_directory, directory_of, parse_times

# as the wrapper writes them (%e %U %S %C; arguments shortened): compiles, a ccache
# preprocessor run, probe compiles and a line GNU time adds for a failed probe
CAPTURED = """\
2.31 2.05 0.22 /w/cc -O2 -c -o kernel/sched/core.o kernel/sched/core.c
0.40 0.30 0.08 /w/cc -E -O2 net/ipv6/route.c -o /w/ccache/tmp/cpp.Ab12.i
1.10 0.95 0.12 /w/cc -O2 -c -o net/ipv6/route.o net/ipv6/route.c
0.51 0.44 0.05 /w/cc -O2 -c -o net/ipv6/addrconf.o net/ipv6/addrconf.c
0.02 0.01 0.00 /w/cc -Werror -mrecord-mcount -c -x c /dev/null -o /dev/null
	Command exited with non-zero status 1
0.05 0.03 0.01 /w/cc -E -dM -x c /dev/null
"""


def test_each_compile_is_charged_to_its_object_and_probes_are_kept_apart():
    compiles = parse_times(CAPTURED)
    assert compiles[0] == Compile("kernel/sched/core.o", 2.31, 2.27)
    assert [c.target for c in compiles] == [
        "kernel/sched/core.o", "(ccache preprocess)", "net/ipv6/route.o", "net/ipv6/addrconf.o",
        "(check)", "(check)"]


def test_directories_are_summed_costliest_first():
    got = {d.directory: (d.objects, round(d.cpu, 2)) for d in by_directory(parse_times(CAPTURED),
                                                                         2)}
    assert got["net/ipv6"] == (2, 1.56) and got["kernel/sched"] == (1, 2.27)
    assert got["(ccache preprocess)"] == (1, 0.38) and got["(check)"] == (2, 0.05)
    assert next(iter(got)) == "kernel/sched"
    assert directory_of("drivers/acpi/acpica/dsutils.o", 2) == "drivers/acpi"
    assert directory_of("vmlinux.o", 2) == "(top)"
