"""The kernels file (testbed.experiment.kernelfile): parsing, every refusal at its line, the
names it gives the kernel axis and requires_kernel; and a fuzz test in the style of
test_config_fuzz.py (any document ends in a KernelSet or a ConfigError, never a traceback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from testbed.errors import ConfigError
from testbed.experiment.kernelfile import (
    DEFAULT_KERNELS_FILE,
    FRAGMENT,
    PATCHES_DIR,
    KernelSet,
    load_kernels,
    loads_kernels,
)
from testbed.experiment.load import loads_experiment
from testbed.experiment.policies import loads_policies

pytestmark = pytest.mark.timeout(300)

WAKE_LOCAL = "0001-net-optionally-wake-socket-readers-on-the-CPU-that-r.patch"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages show paths relative to the working directory: make that the test's dir."""
    monkeypatch.chdir(tmp_path)


def _load(tmp_path: Path, text: str, name: str = "kernels.yaml") -> KernelSet:
    path = tmp_path / name
    path.write_text(text)
    return load_kernels(path)


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    return [line.split("kernels.yaml:", 1)[1] for line in info.value.message.splitlines()]


def test_shipped_file_keeps_stock_and_patched_as_recipe_1_built_them() -> None:
    k = load_kernels()
    assert k.path == DEFAULT_KERNELS_FILE
    assert k.names[:3] == ["distro", "stock", "patched"]
    stock, patched = k.variant("stock"), k.variant("patched")
    assert (stock.base.name, stock.patches, stock.config, stock.localversion) == (
        "debian-6.1", (), None, "")
    assert [r.path for r in patched.patches] == [PATCHES_DIR / WAKE_LOCAL]
    assert patched.localversion == "-wakelocal" and patched.base == stock.base
    assert stock.fragments == (FRAGMENT,)
    assert "distro" in k and "stock" in k and "nope" not in k


def test_a_user_variant_with_its_own_patch_fragment_and_local_base(tmp_path: Path) -> None:
    (tmp_path / "mine.patch").write_text("--- a/x\n+++ b/x\n")
    (tmp_path / "extra.config").write_text("CONFIG_FOO=y\n# CONFIG_BAR is not set\n")
    (tmp_path / "linux-6.6.tar.xz").write_bytes(b"")
    k = _load(tmp_path, f"""
variants:
  mine:
    description: my patch on top of the wake-local one
    patches: [{WAKE_LOCAL}, mine.patch]
    config: extra.config
  local:
    base: ./linux-6.6.tar.xz
""")
    mine = k.variant("mine")
    assert mine.base.name == "debian-6.1"  # the default base
    assert [r.path for r in mine.patches] == [PATCHES_DIR / WAKE_LOCAL, tmp_path / "mine.patch"]
    assert ":5:" in mine.patches[1].where  # its item's line, for build-time errors
    assert mine.config == tmp_path / "extra.config"
    assert mine.fragments == (FRAGMENT, tmp_path / "extra.config")
    assert mine.localversion == "-mine"  # default: -<name>
    assert k.variant("local").base.kind == "tarball"
    assert k.variant("local").base.path == (tmp_path / "linux-6.6.tar.xz").resolve()
    with pytest.raises(ConfigError, match=r"unknown kernel 'stock' \(kernels.yaml has: mine, "):
        k.variant("stock")


def test_every_bad_variant_is_refused_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "bad.config").write_text("CONFIG_A=y\nA=y\n")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "dir").mkdir()
    got = _problems(tmp_path, """\
variants:
  a:
    base: debian-5.10
  b:
    patches: [nope.patch]
  c:
    config: bad.config
  d:
    config: missing.config
  distro: {}
  E: {}
  f:
    localversion: wake local
  g:
    base: ./notes.txt
  h:
    base: ./dir
  i:
    basis: debian-6.1
  j:
    patches: [0001-net-optionally-wake-socket-readers-on-the-CPU-that-r.patch,
              0001-net-optionally-wake-socket-readers-on-the-CPU-that-r.patch]
""")
    assert got == [
        "3:11: variants.a.base: unknown base 'debian-5.10' (allowed: debian-6.1, debian-6.12, "
        "or a path to a kernel source tarball or tree, e.g. ./linux-6.6.tar.xz)",
        "5:15: variants.b.patches[0]: patch 'nope.patch' not found (looked in "
        f"./ and {PATCHES_DIR}/)",
        "7:13: variants.c.config: bad.config:2: not a Kconfig line: 'A=y'",
        "9:13: variants.d.config: missing.config: no such file (the path is relative to the "
        "kernels file)",
        "10:3: variants.distro.name: 'distro' is reserved (distro: Debian's packaged kernel; "
        "all: every variant); choose another name",
        "11:3: variants.E.name: kernel name 'E' must be lowercase letters, digits, '.' and '-', "
        "starting with a letter or digit, at most 32 (it becomes part of cell ids and folder "
        "names)",
        "13:19: variants.f.localversion: localversion 'wake local' must be empty or start with "
        "'-' and hold letters, digits and . _ + - (at most 32); it is appended to `uname -r`",
        "15:11: variants.g.base: notes.txt is a file but not a tarball (.tar, .tar.xz, .tar.gz, "
        ".tgz, .tar.bz2, .tar.zst)",
        "17:11: variants.h.base: dir is not a kernel source tree (no Makefile and Kconfig at "
        "its top)",
        "19:5: variants.i: unknown key 'basis' (allowed: name, description, base, patches, "
        "config, localversion); did you mean 'base'?",
        "22:15: variants.j.patches[1]: 0001-net-optionally-wake-socket-readers-on-the-CPU-"
        "that-r.patch is listed twice (first as item 0)",
    ]


def test_duplicate_names_and_indistinguishable_releases_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kernels.yaml:3:3: .*duplicate key \"a\""):
        _load(tmp_path, "variants:\n  a: {}\n  a: {}\n")
    assert _problems(tmp_path, "variants:\n  a: {localversion: -x}\n  b: {localversion: -x}\n"
                     ) == ["3:3: variants.b: same base and localversion (-x) as 'a': `uname -r` "
                           "could not tell them apart; give it its own localversion"]


@pytest.mark.parametrize("text, message", [
    ("", "1:1: expected a mapping with a `variants:` key"),
    ("variants: {}\n", "1:1: variants: no variants defined"),
    ("- a\n", "1:1: expected a mapping with a `variants:` key"),
    ("variants: {a: {name: b}}\n", "1:22: variants.a.name: variant 'a' has name 'b'; drop "
     "`name:` (the key is the name)"),
])
def test_empty_or_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert info.value.message.split("kernels.yaml:", 1)[1] == message


def test_experiment_names_kernels_of_its_kernels_file(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "kernels.yaml").write_text("variants:\n  mine: {}\n")
    exp = loads_experiment("kernels_file: k/kernels.yaml\naxes: {kernel: [distro, mine]}\n",
                           tmp_path / "e.yaml")
    assert exp.kernels.names == ["distro", "mine"]
    with pytest.raises(ConfigError) as info:
        loads_experiment("kernels_file: k/kernels.yaml\naxes: {kernel: [mien, stock]}\n",
                         tmp_path / "e.yaml")
    assert info.value.message.splitlines() == [
        "e.yaml:2:17: axes.kernel[0]: unknown kernel 'mien' (allowed: distro, mine; variants "
        "come from kernels.yaml); did you mean 'mine'?",
        "e.yaml:2:23: axes.kernel[1]: unknown kernel 'stock' (allowed: distro, mine; variants "
        "come from kernels.yaml)"]


def test_a_broken_or_missing_kernels_file_points_at_the_experiment_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"e.yaml:1:15: kernels_file: .*no.yaml: no such file "
                                          r"\(the path is relative to this experiment file\)"):
        loads_experiment("kernels_file: no.yaml\n", tmp_path / "e.yaml")
    (tmp_path / "k.yaml").write_text("variants:\n  a: {base: nope}\n")
    with pytest.raises(ConfigError) as info:
        loads_experiment("kernels_file: k.yaml\n", tmp_path / "e.yaml")
    lines = info.value.message.splitlines()
    assert lines[0].endswith("k.yaml:2:13: variants.a.base: unknown base 'nope' (allowed: "
                             "debian-6.1, debian-6.12, or a path to a kernel source tarball or "
                             "tree, e.g. ./linux-6.6.tar.xz)")
    assert lines[1] == ("e.yaml:1:15: kernels_file: the kernels file named here has the "
                        "problems above")


def test_requires_kernel_accepts_variants_of_the_given_and_the_shipped_file(
        tmp_path: Path) -> None:
    kernels = _load(tmp_path, "variants:\n  mine: {}\n")
    text = b"policies:\n  p: {requires_kernel: [mine, patched]}\n"
    assert loads_policies(text, tmp_path / "p.yaml", kernels)["p"].requires_kernel == [
        "mine", "patched"]
    with pytest.raises(ConfigError, match=r"p.yaml:2:7: policies.p.requires_kernel: unknown "
                                          r"kernel 'mine' \(allowed: distro, stock, patched"):
        loads_policies(text, tmp_path / "p.yaml")  # the shipped file has no `mine`
    with pytest.raises(ConfigError, match=r"unknown kernel 'mien' \(allowed: distro, mine, "
                                          r"stock, patched.*; variants come from kernels.yaml "
                                          r"and kernels.yaml\)"):
        loads_policies(b"policies:\n  p: {requires_kernel: [mien]}\n", tmp_path / "p.yaml",
                       kernels)


def test_a_policy_that_needs_a_user_variant_runs_only_with_it(tmp_path: Path) -> None:
    (tmp_path / "k.yaml").write_text("variants:\n  mine: {}\n  other: {}\n")
    (tmp_path / "p.yaml").write_text("policies:\n  default: {}\n"
                                     "  p: {requires_kernel: [mine]}\n")
    head = "kernels_file: k.yaml\npolicies_file: p.yaml\n"
    exp = loads_experiment(head + "axes: {kernel: [mine], policy: [p]}\n", tmp_path / "e.yaml")
    assert exp.policies["p"].requires_kernel == ["mine"]
    with pytest.raises(ConfigError, match=r"policy 'p' needs kernel mine, but a cell pairs it "
                                          r"with kernel 'other'"):
        loads_experiment(head + "axes: {kernel: [other], policy: [p]}\n", tmp_path / "e.yaml")


# ------------------------------------------------------------------ fuzz

FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=10_000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
TRICKY = ["", " ", "~", "~nosuchuser/x", "/", "..", "../x", "./", "/dev/null", "/etc/passwd",
          "a\0b", "debian-6.1", "debian-6.12", "debian-", "-x", "-", "--", "x" * 300, "０",
          WAKE_LOCAL, "mine.patch", "extra.config", "kernels.yaml", "all", "distro", "Stock",
          True, None, 0, 1.5, [], {}, ["x"]]
scalars = st.one_of(st.booleans(), st.none(), st.integers(), st.text(max_size=12),
                    st.sampled_from(TRICKY))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
variant_bodies = st.one_of(junk, st.fixed_dictionaries({}, optional={
    "description": st.one_of(st.text(max_size=10), junk),
    "base": st.one_of(st.sampled_from(TRICKY), junk),
    "patches": st.one_of(st.lists(st.sampled_from(TRICKY), max_size=3), junk),
    "config": st.one_of(st.sampled_from(TRICKY), junk),
    "localversion": st.one_of(st.sampled_from(["", "-a", "-wakelocal", "a", "-a b", "-" * 40]),
                              junk),
    "name": st.sampled_from(["a", "b", "x"]),
    "typo": junk,
}))
files = st.one_of(junk, st.fixed_dictionaries({"variants": st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(["a", "b", "stock", "distro", "all", "A", "a.b",
                                                "x" * 40, "-a"]), st.text(max_size=6)),
                    variant_bodies, max_size=4), junk)}, optional={"extra": junk}))


def _yaml(data: Any) -> str:
    import io

    out = io.StringIO()
    YAML(typ="safe", pure=True).dump(data, out)
    return out.getvalue()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kfuzz")
    (d / "mine.patch").write_text("--- a/x\n+++ b/x\n")
    (d / "extra.config").write_text("CONFIG_FOO=y\n")
    return d


@FUZZ
@given(st.one_of(files, files, st.text(max_size=200).map(str.encode), st.binary(max_size=60)))
def test_any_kernels_file_is_accepted_or_refused_cleanly(fuzz_dir: Path,
                                                        data: Any) -> None:
    raw = data if isinstance(data, bytes) else _yaml(data).encode()
    try:
        kernels = loads_kernels(raw, fuzz_dir / "kernels.yaml")
    except ConfigError as e:
        assert e.message.split(":", 1)[0].endswith("kernels.yaml") and len(str(e)) < 4000, \
            e.message
        return
    for name, v in kernels.variants.items():  # what was accepted is complete and sane
        assert name == v.name and name not in ("distro", "all")
        assert all(ref.path.is_file() for ref in v.patches)
        assert v.config is None or v.config.is_file()
        assert v.localversion == "" or v.localversion.startswith("-")
    releases = [(v.base.name, v.localversion) for v in kernels.variants.values()]
    assert len(releases) == len(set(releases))
