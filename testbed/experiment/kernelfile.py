"""Kernel variants as data: configs/kernels.yaml -> validated variants (pure but for reads).

A variant is a base source, an ordered patch list and an optional Kconfig fragment on
top of images/kernel/netbed.config, plus the LOCALVERSION that makes `uname -r` tell
it apart. The `kernel` axis of an experiment names variants of this file (or
`distro`, Debian's packaged kernel, which is not built). Like the policies, the file
is checked before anything boots, and every problem is reported at its
`file:line:col`: an unknown base, a patch or fragment that is missing, a fragment
line that is not Kconfig, a name used twice or reserved, two variants of one base
that `uname -r` could not tell apart. Whether a patch applies and whether Kconfig
keeps the fragment's options need the source tree; testbed.build.kernel_build checks
those before it compiles anything.

    variants:
      stock:   {base: debian-6.1, localversion: ""}
      patched: {base: debian-6.1, patches: [0001-....patch], localversion: -wakelocal}

Paths (patches, config, a local base) are relative to the kernels file; a patch not
found there is looked up in images/patches/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from testbed.errors import ConfigError
from testbed.experiment.yamlload import (
    Problem,
    Source,
    display_path,
    load_yaml,
    parse_yaml,
    plain,
    raise_problems,
    shown,
    unreadable_reason,
    validation_problems,
)
from testbed.settings import CONFIGS_DIR, IMAGES_DIR
from testbed.vocabulary import DISTRO_KERNEL, kernel_name_problem

DEFAULT_KERNELS_FILE = CONFIGS_DIR / "kernels.yaml"
PATCHES_DIR = IMAGES_DIR / "patches"
FRAGMENT = IMAGES_DIR / "kernel" / "netbed.config"
MAX_VARIANTS = 64
MAX_PATCHES = 200
MAX_LOCALVERSION = 32        # uname's release field holds 64 characters
RESERVED = (DISTRO_KERNEL, "all")  # `distro` is not built; `all` means every variant
_LOCALVERSION_RE = re.compile(r"^(-[A-Za-z0-9._+-]*)?$")
TARBALL_SUFFIXES = (".tar", ".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".tar.zst")

Text = Annotated[str, Strict()]


@dataclass(frozen=True)
class DebianSource:
    """A Debian `linux-source-X` package; `suite` None means the host's own apt sources."""

    package: str
    suite: str | None

    @property
    def tarball(self) -> str:
        """Where the package puts the source (inside the .deb, and on the host if installed)."""
        return f"/usr/src/{self.package}.tar.xz"


# The Debian bases netbed knows how to fetch. 6.1 is bookworm's own kernel (the package
# is installed on the host); 6.12 is bookworm-backports' (fetched into the cache with
# apt options of netbed's own, never installed; Debian builds it with bookworm's gcc-12).
DEBIAN_BASES: dict[str, DebianSource] = {
    "debian-6.1": DebianSource("linux-source-6.1", None),
    "debian-6.12": DebianSource("linux-source-6.12", "bookworm-backports"),
}
DEFAULT_BASE = "debian-6.1"


# ---------------------------------------------------------------- Kconfig fragments


@dataclass(frozen=True)
class ConfigLine:
    """One requested option of a fragment, with where it came from (for errors)."""

    name: str
    value: str  # "y", "m", a number, a quoted string, or "n" for "is not set"
    line: int
    source: str = "<config>"


_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str, source: str = "<config>") -> dict[str, ConfigLine]:
    """Parse a Kconfig fragment or .config; anything unrecognised is an error naming the line."""
    out: dict[str, ConfigLine] = {}
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if m := _SET.match(line):
            name, value = m.group(1), m.group(2)
        elif m := _UNSET.match(line):
            name, value = m.group(1), "n"
        elif line.startswith("#"):
            continue
        else:
            raise ConfigError(
                f"{source}:{no}: not a Kconfig line: {line!r}",
                hint="write CONFIG_NAME=value or '# CONFIG_NAME is not set'",
            )
        if name in out:
            raise ConfigError(
                f"{source}:{no}: {name} set twice (first at line {out[name].line})",
                hint="keep one of the two lines",
            )
        out[name] = ConfigLine(name, value, no, source)
    return out


# ---------------------------------------------------------------- the file's schema


class VariantSpec(BaseModel):
    """One variant as written in the kernels file (paths not resolved yet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Text
    description: Text = ""
    base: Text = DEFAULT_BASE
    patches: list[Text] = Field(default_factory=list, max_length=MAX_PATCHES)
    config: Text | None = None
    localversion: Text | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if problem := kernel_name_problem(v):
            raise ValueError(problem)
        if v in RESERVED:
            raise ValueError(f"{v!r} is reserved ({DISTRO_KERNEL}: Debian's packaged kernel; "
                             "all: every variant); choose another name")
        return v

    @field_validator("localversion")
    @classmethod
    def _localversion(cls, v: str | None) -> str | None:
        if v is not None and (not _LOCALVERSION_RE.match(v) or len(v) > MAX_LOCALVERSION):
            raise ValueError(f"localversion {shown(v)} must be empty or start with '-' and "
                             f"hold letters, digits and . _ + - (at most {MAX_LOCALVERSION}); "
                             "it is appended to `uname -r`")
        return v


class KernelsFileModel(BaseModel):
    """The file's shape; each variant is validated on its own, so every problem of every
    variant is reported at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variants: dict[str, Any] = Field(max_length=MAX_VARIANTS)


# ---------------------------------------------------------------- resolved variants


@dataclass(frozen=True)
class Base:
    """Where a variant's source comes from: a Debian package, or a local tarball/tree."""

    name: str                       # debian-6.1, or the path as written
    debian: DebianSource | None = None
    path: Path | None = None        # local tarball or tree, resolved

    @property
    def kind(self) -> str:
        if self.debian is not None:
            return "debian"
        assert self.path is not None
        return "tarball" if self.path.is_file() else "tree"


@dataclass(frozen=True)
class PatchRef:
    """A patch file of a variant and the place in the kernels file that names it."""

    path: Path
    where: str  # file:line:col of the list item


@dataclass(frozen=True)
class Variant:
    """A buildable kernel: everything its cache key and its build need."""

    name: str
    description: str
    base: Base
    patches: tuple[PatchRef, ...]
    config: Path | None          # extra fragment on top of netbed.config
    localversion: str
    where: str                   # file:line:col of the variant (for build-time errors)

    @property
    def fragments(self) -> tuple[Path, ...]:
        """Kconfig fragments merged in order (a later one wins)."""
        return (FRAGMENT,) if self.config is None else (FRAGMENT, self.config)


@dataclass(frozen=True)
class KernelSet:
    """The variants of one kernels file, by name; `distro` is always there besides them."""

    path: Path
    variants: dict[str, Variant]

    @property
    def names(self) -> list[str]:
        """Every kernel an experiment may name: distro first, then the file's order."""
        return [DISTRO_KERNEL, *self.variants]

    def __contains__(self, name: object) -> bool:
        return name == DISTRO_KERNEL or name in self.variants

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            raise ConfigError(
                f"unknown kernel {name!r} ({display_path(self.path)} has: "
                f"{', '.join(self.variants) or 'no variants'})",
                hint=f"use {DISTRO_KERNEL} or a variant of {display_path(self.path)}, or add "
                     "one there (docs/kernels.md)")
        return self.variants[name]


def load_kernels(path: Path | None = None) -> KernelSet:
    """Load and validate a kernels file (default configs/kernels.yaml); every problem is
    reported at its file:line:col."""
    return _kernels_from(load_yaml(DEFAULT_KERNELS_FILE if path is None else path))


def loads_kernels(data: bytes, path: Path) -> KernelSet:
    """`load_kernels` for a document already in memory; `path` names it (and anchors paths)."""
    return _kernels_from(parse_yaml(data, path))


def _kernels_from(src: Source) -> KernelSet:
    data = plain(src)
    if src.empty or not isinstance(data, dict):
        raise ConfigError(f"{src.name}:1:1: expected a mapping with a `variants:` key",
                          hint=f"see {display_path(DEFAULT_KERNELS_FILE)}")
    try:
        model = KernelsFileModel.model_validate(data)
    except ValidationError as e:
        raise_problems(validation_problems(src, e, KernelsFileModel))
        raise  # pragma: no cover - raise_problems always raises for a non-empty list
    problems: list[Problem] = []
    out: dict[str, Variant] = {}
    for key, body in model.variants.items():
        # the mapping key is the name; `name:` inside is optional
        body = {"name": key, **body} if isinstance(body, dict) else \
            {"name": key} if body is None else body
        try:
            spec = VariantSpec.model_validate(body)
        except ValidationError as e:
            problems += validation_problems(src, e, VariantSpec, ("variants", key))
            continue
        if spec.name != key:
            problems.append(src.problem(("variants", key, "name"),
                                        f"variant {key!r} has name {spec.name!r}; drop "
                                        "`name:` (the key is the name)"))
            continue
        variant = _resolve(src, spec, problems)
        if variant is not None:
            out[key] = variant
    if not model.variants:
        problems.append(src.problem(("variants",), "no variants defined"))
    problems += _release_clashes(src, out)
    raise_problems(problems, hint="the kernels file format is in images/kernel/README.md")
    return KernelSet(src.path, out)


def _where(src: Source, loc: tuple[str | int, ...]) -> str:
    p = src.problem(loc, "")
    return f"{p.file}:{p.line}:{p.col}"


def _expand(written: str) -> Path:
    try:
        return Path(written).expanduser() if written.startswith("~") else Path(written)
    except RuntimeError:  # ~nosuchuser: left as written; it names no file (reported)
        return Path(written)


def _relative(src: Source, written: str) -> Path:
    p = _expand(written)
    return p if p.is_absolute() else src.path.parent / p


def _resolve(src: Source, spec: VariantSpec, problems: list[Problem]) -> Variant | None:
    loc: tuple[str | int, ...] = ("variants", spec.name)
    before = len(problems)
    base = _base(src, spec, problems)
    patches: list[PatchRef] = []
    for i, written in enumerate(spec.patches):
        found = _patch_path(src, written)
        if isinstance(found, str):
            problems.append(src.problem((*loc, "patches", i), found))
        else:
            patches.append(PatchRef(found, _where(src, (*loc, "patches", i))))
    seen: dict[Path, int] = {}
    for i, ref in enumerate(patches):
        if ref.path.resolve() in seen:
            problems.append(src.problem((*loc, "patches", i), f"{ref.path.name} is listed "
                                        f"twice (first as item {seen[ref.path.resolve()]})"))
        seen.setdefault(ref.path.resolve(), i)
    config = None
    if spec.config is not None:
        config = _relative(src, spec.config)
        reason = unreadable_reason(config)
        if reason:
            problems.append(src.problem((*loc, "config"), f"{display_path(config)}: {reason} "
                                        "(the path is relative to the kernels file)"))
        else:
            try:
                parse_config(config.read_text(errors="replace"), display_path(config))
            except ConfigError as e:
                problems.append(src.problem((*loc, "config"), e.message))
    if len(problems) > before or base is None:
        return None
    localversion = spec.localversion if spec.localversion is not None else f"-{spec.name}"
    return Variant(spec.name, spec.description, base, tuple(patches), config, localversion,
                   _where(src, loc))


def _base(src: Source, spec: VariantSpec, problems: list[Problem]) -> Base | None:
    written = spec.base
    where = ("variants", spec.name, "base")
    if written in DEBIAN_BASES:
        return Base(written, debian=DEBIAN_BASES[written])
    if "/" not in written and not written.startswith("~"):
        problems.append(src.problem(where, f"unknown base {shown(written)} (allowed: "
                                    f"{', '.join(DEBIAN_BASES)}, or a path to a kernel source "
                                    "tarball or tree, e.g. ./linux-6.6.tar.xz)"))
        return None
    path = _relative(src, written)
    if path.is_file():
        if not path.name.endswith(TARBALL_SUFFIXES):
            problems.append(src.problem(where, f"{display_path(path)} is a file but not a "
                                        f"tarball ({', '.join(TARBALL_SUFFIXES)})"))
            return None
    elif path.is_dir():
        if not ((path / "Makefile").is_file() and (path / "Kconfig").is_file()):
            problems.append(src.problem(where, f"{display_path(path)} is not a kernel source "
                                        "tree (no Makefile and Kconfig at its top)"))
            return None
    else:
        problems.append(src.problem(where, f"{display_path(path)}: no such file or directory "
                                    "(a local base is relative to the kernels file)"))
        return None
    return Base(written, path=path.resolve())


def _patch_path(src: Source, written: str) -> Path | str:
    """The patch file `written` names, or why there is none."""
    first = _relative(src, written)
    tried = [first]
    if not Path(written).is_absolute() and not written.startswith("~"):
        tried.append(PATCHES_DIR / written)
    for p in tried:
        if p.is_file():
            reason = unreadable_reason(p)
            return p if reason is None else f"{display_path(p)}: {reason}"
    return (f"patch {shown(written)} not found (looked in "
            f"{' and '.join(display_path(p.parent) + '/' for p in tried)})")


def _release_clashes(src: Source, variants: dict[str, Variant]) -> list[Problem]:
    """Two variants of one base with one localversion: `uname -r` could not tell them apart."""
    seen: dict[tuple[str, str], str] = {}
    out = []
    for v in variants.values():
        key = (v.base.name, v.localversion)
        if key in seen:
            out.append(src.problem(("variants", v.name), f"same base and localversion "
                                   f"({v.localversion or 'none'}) as {seen[key]!r}: `uname -r` "
                                   "could not tell them apart; give it its own localversion"))
        seen.setdefault(key, v.name)
    return out


def kernel_names_text(kernels: KernelSet) -> str:
    return ", ".join(kernels.names)


def check_kernel_names(names: list[Any], kernels: KernelSet | None = None) -> str | None:
    """Why a policy's requires_kernel list is not allowed, or None.

    A name must be a kernel of configs/kernels.yaml or of `kernels` (an experiment's own
    file): shipped policies name shipped variants, and a user's file need not repeat them.
    Whether the experiment pairs the policy with such a kernel is the experiment's check.
    """
    shipped = load_kernels()
    sets = [shipped] if kernels is None or kernels.path == shipped.path else [kernels, shipped]
    for name in names:
        if not any(name in k for k in sets):
            allowed = ", ".join(dict.fromkeys(n for k in sets for n in k.names))
            files = " and ".join(k.path.name for k in sets)
            return f"unknown kernel {shown(name)} (allowed: {allowed}; variants come from {files})"
    return None


def resolve_kernels_path(exp_path: Path, value: str | None) -> Path:
    """Where `kernels_file:` points: relative to the experiment file, `~` expanded."""
    if value is None:
        return DEFAULT_KERNELS_FILE
    p = _expand(value)
    return p if p.is_absolute() or str(exp_path) == "-" else exp_path.parent / p
