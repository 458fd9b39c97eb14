"""Experiment YAML -> validated models (Experiment, Cell): the schema, strict where it matters.

An experiment is a matrix: the cartesian product of its axes (kernel, nic,
cpus, policy, workload, gro, rcvbuf), minus `exclude` entries, plus `include` entries,
with GitHub Actions matrix semantics adapted to cells whose fields are all fixed:

- `exclude` is applied first: it removes every combination that matches all of
  the entry's keys (a workload written without a size, e.g. `TCP_RR`, matches
  every size of that workload).
- `include` comes after `exclude` (so it can add back an excluded combination).
  An entry that matches an existing combination on all its keys would only
  "extend" it, and every key is already an axis, so it changes nothing. An entry
  that matches none adds a new cell; axes it does not name take the axis's
  FIRST value (GitHub would leave them unset; a cell needs every field).

Types are strict where coercion would hide a mistake: a boolean is not a
number (`cpus: [true]`), a quoted number is text, `1e3` is not a whole number.
Loading a file and the cross checks that need the policies and the matrix are
in testbed.experiment.load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Strict,
    Tag,
    field_validator,
    model_validator,
)

from testbed.experiment.kernelfile import KernelSet, load_kernels
from testbed.experiment.policies import PolicySet, load_policies
from testbed.experiment.yamlload import cut, shown
from testbed.runname import name_problem
from testbed.vocabulary import (
    AXES,
    CounterName,
    KernelName,
    NicName,
    OrderName,
    WorkloadName,
)

__all__ = [
    "AXES",
    "DEFAULT_MESSAGE_SIZE",
    "MAX_CPUS",
    "AdaptiveRepetitions",
    "Axes",
    "Cell",
    "Combination",
    "Experiment",
    "Limits",
    "Workload",
    "WorkloadMatch",
]

# Send size for the bulk workloads (netperf -m), request = response size for RR.
DEFAULT_MESSAGE_SIZE: dict[str, int] = {"TCP_STREAM": 16384, "TCP_MAERTS": 16384, "TCP_RR": 1}
MAX_CPUS = 64
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
MAX_ENTRIES = 500            # include / exclude entries (each is matched against every cell)

Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
CpuCount = Annotated[int, Strict(), Field(ge=1, le=MAX_CPUS)]
MessageSize = Annotated[int, Strict(), Field(ge=1, le=MAX_MESSAGE_SIZE)]
# --------------------------------------------------------------------------- the copy-lag axis
# `rcvbuf`: how much the receiver's socket may queue for the measured connection
# (docs/copy-lag.md). `auto` is the kernel's autotuning (tcp_rmem up to 6 MiB), netbed's
# behaviour before the axis and the default; a size is set with netperf's `-S` on
# netserver's socket (testbed.formats.netperf.receive_buffer_args), with the receiver's
# net.core.rmem_max raised to it first (testbed.formats.sockqueue.rmem_max_command).
# Sizes stay below tcp_rmem's 6 MiB maximum, so the raised rmem_max cannot change the
# window scale later autotuned connections choose (tcp_select_initial_window takes the
# larger of the two). TCP_MAERTS is refused with a level (testbed.experiment.load): there
# the receiver guest sends. TCP_RR takes levels, which bind only below the request size.
RCVBUF_AUTO = "auto"
KIB = 1024
MIB = 1024 * 1024
RCVBUF_MIN = 4 * KIB
RCVBUF_MAX = 4 * MIB
RCVBUF_MAERTS_REASON = ("TCP_MAERTS sends from the receiver guest; the queue a level would "
                        "bound is on the sender guest")
_LEVEL_RE = re.compile(r"^([0-9]{1,9})\s*([KkMm](?:iB)?)?$")


def rcvbuf_level(value: Any) -> str:
    """A level as written -> its canonical text (`auto`, `64K`, `1M`, `1536`): the largest
    unit that divides it, so `1024K` and `1M` are one level (one cell id). ValueError with
    the fix for anything else."""
    if isinstance(value, bool) or value is None:
        raise ValueError(_bad_level(value))
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() == RCVBUF_AUTO:
            return RCVBUF_AUTO
        m = _LEVEL_RE.match(text)
        if not m:
            hint = (" (KB is ambiguous: write K for KiB)"
                    if re.match(r"^[0-9]+\s*[KkMm][Bb]$", text) else "")
            raise ValueError(_bad_level(value) + hint)
        size = int(m.group(1)) * {"": 1, "K": KIB, "M": MIB}[(m.group(2) or "")[:1].upper()]
    else:
        raise ValueError(_bad_level(value))
    if not RCVBUF_MIN <= size <= RCVBUF_MAX:
        raise ValueError(f"rcvbuf {_shown_level(value)} is {size} bytes; levels lie between "
                         "4K and 4M (above 4M the raised net.core.rmem_max would pass "
                         "tcp_rmem's 6 MiB and change other connections' window scale)")
    if size % MIB == 0:
        return f"{size // MIB}M"
    return f"{size // KIB}K" if size % KIB == 0 else str(size)


def rcvbuf_bytes(level: str) -> int | None:
    """Bytes of a canonical level (`64K` -> 65536); None for `auto`."""
    if level == RCVBUF_AUTO:
        return None
    m = _LEVEL_RE.match(level)
    if not m:
        raise ValueError(_bad_level(level))
    return int(m.group(1)) * {"": 1, "K": KIB, "M": MIB}[(m.group(2) or "")[:1].upper()]


def _shown_level(value: Any) -> str:
    return (f"'{value[:40]}'" if isinstance(value, str) else repr(value))[:60]


def _bad_level(value: Any) -> str:
    return (f"rcvbuf {_shown_level(value)} is not a level; write auto, a size with K or M "
            "(KiB, MiB: 64K, 256K, 1M) or a whole number of bytes")


# A copy-lag level in a model: canonical text.
Rcvbuf = Annotated[str, BeforeValidator(rcvbuf_level)]

_SIZE_RE = re.compile(r"^[0-9]{1,9}$")


def _parse_workload_text(value: Any, *, sized: bool) -> Any:
    """'TCP_RR:1' -> {'name': 'TCP_RR', 'message_size': 1}; mappings pass through."""
    if isinstance(value, str):
        name, sep, size = value.partition(":")
        out: dict[str, Any] = {"name": name.strip()}
        if sep:
            size = size.strip()
            if not _SIZE_RE.match(size):
                raise ValueError(f"workload {shown(value)}: the size after ':' must be a whole "
                                 "number of bytes, e.g. TCP_RR:1")
            out["message_size"] = int(size)
        elif sized:
            out["message_size"] = DEFAULT_MESSAGE_SIZE.get(out["name"], 1)
        return out
    if isinstance(value, dict):
        if "name" not in value and len(value) == 1:
            k, v = next(iter(value.items()))
            k, v = cut(str(k), 40), cut(str(v), 40)
            raise ValueError(f"`{k}: {v}` is a mapping because of the space after ':'; "
                             f"write {k}:{v} (no space) or {{name: {k}, message_size: {v}}}")
        given = value.get("name")
        if sized and "message_size" not in value and isinstance(given, str) \
                and given in DEFAULT_MESSAGE_SIZE:
            return {**value, "message_size": DEFAULT_MESSAGE_SIZE[given]}
        return value
    raise ValueError(f"a workload is written 'TCP_STREAM', 'TCP_RR:1' or "
                     f"{{name: TCP_RR, message_size: 1}}, not {shown(value)}")


class Workload(BaseModel):
    """What netperf runs: the test and its message size in bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: WorkloadName
    message_size: MessageSize

    @model_validator(mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _parse_workload_text(value, sized=True)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.message_size}"

    def __str__(self) -> str:
        return self.id


class WorkloadMatch(BaseModel):
    """A workload in include/exclude: without a size it matches every size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: WorkloadName
    message_size: MessageSize | None = None

    @model_validator(mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _parse_workload_text(value, sized=False)

    def matches(self, w: Workload) -> bool:
        return w.name == self.name and self.message_size in (None, w.message_size)

    def to_workload(self) -> Workload:
        size = self.message_size or DEFAULT_MESSAGE_SIZE[self.name]
        return Workload(name=self.name, message_size=size)


def _gro_bool(value: Any) -> Any:
    """YAML 1.2 leaves `on`/`off` as strings; accept them (and true/false) for GRO.

    yes/no stay refused (with a hint): the allowed words are on, off, true, false.
    """
    if isinstance(value, str) and value.strip().lower() in ("on", "off"):
        return value.strip().lower() == "on"
    return value


def gro_word(value: bool) -> str:
    return "on" if value else "off"


class Cell(BaseModel):
    """One point of the matrix: one pair of guests configured one way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: KernelName
    nic: NicName
    cpus: CpuCount
    policy: Text
    workload: Workload
    gro: Bool
    rcvbuf: Rcvbuf = RCVBUF_AUTO

    @field_validator("gro", mode="before")
    @classmethod
    def _gro(cls, v: Any) -> Any:
        return _gro_bool(v)

    @property
    def cell_id(self) -> str:
        """Readable, filesystem-safe and injective (policy names are lowercase, workloads not).

        Only a non-auto rcvbuf adds a part, so the cells of configs without the axis
        keep the ids they had before it (old runs and fixtures still analyse)."""
        suffix = "" if self.rcvbuf == RCVBUF_AUTO else f"-rcvbuf_{self.rcvbuf}"
        return (f"{self.kernel}-{self.nic}-c{self.cpus}-{self.policy}-{self.workload.id}-"
                f"gro_{gro_word(self.gro)}{suffix}")

    @property
    def boot_key(self) -> tuple[str, str, int]:
        """Cells with equal boot keys can share a booted pair of guests (policy/GRO reset)."""
        return (self.kernel, self.nic, self.cpus)

    def flat(self) -> dict[str, Any]:
        """One flat row (for tables, cells.json consumers and analysis)."""
        return {"cell_id": self.cell_id, "kernel": self.kernel, "nic": self.nic,
                "cpus": self.cpus, "policy": self.policy, "workload": self.workload.name,
                "message_size": self.workload.message_size, "gro": self.gro,
                "rcvbuf": self.rcvbuf}


# Defaults as functions, typed as their Literals (a lambda's list would be list[str]).
def _default_kernels() -> list[KernelName]:
    return ["distro"]


def _default_nics() -> list[NicName]:
    return ["virtio"]


def _default_counters() -> list[CounterName]:
    return ["auto"]


def _as_list(v: Any) -> Any:
    """An axis written as a single value means a one-value axis."""
    return v if isinstance(v, list) else [v]


class Axes(BaseModel):
    """The matrix axes; an axis left out has one value, the one shown here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: list[KernelName] = Field(default_factory=_default_kernels, min_length=1)
    nic: list[NicName] = Field(default_factory=_default_nics, min_length=1)
    cpus: list[CpuCount] = Field(default_factory=lambda: [2], min_length=1)
    policy: list[Text] = Field(default_factory=lambda: ["default"], min_length=1)
    workload: list[Workload] = Field(
        default_factory=lambda: [Workload(name="TCP_STREAM", message_size=16384)], min_length=1)
    gro: list[Bool] = Field(default_factory=lambda: [True], min_length=1)
    rcvbuf: list[Rcvbuf] = Field(default_factory=lambda: [RCVBUF_AUTO], min_length=1)

    @field_validator("kernel", "nic", "cpus", "policy", "workload", "gro", "rcvbuf",
                     mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return _as_list(v)

    @field_validator("gro", mode="before")
    @classmethod
    def _gro(cls, v: Any) -> Any:
        return [_gro_bool(x) for x in _as_list(v)]

    def size(self) -> int:
        """Combinations before exclude: the product of the axes' lengths."""
        n = 1
        for axis in AXES:
            n *= len(getattr(self, axis))
        return n


class Combination(BaseModel):
    """An include/exclude entry: some axes with one value each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: KernelName | None = None
    nic: NicName | None = None
    cpus: CpuCount | None = None
    policy: Text | None = None
    workload: WorkloadMatch | None = None
    gro: Bool | None = None
    rcvbuf: Rcvbuf | None = None

    @field_validator("gro", mode="before")
    @classmethod
    def _gro(cls, v: Any) -> Any:
        return _gro_bool(v)

    @model_validator(mode="before")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if isinstance(v, dict) and not v:
            raise ValueError(f"empty entry; name at least one of {', '.join(AXES)}")
        if not isinstance(v, dict):
            raise ValueError(f"expected a mapping of axis to value, e.g. "
                             f"{{nic: e1000, policy: pin-cross}}, got {shown(v)}")
        return v

    def given_axes(self) -> list[str]:
        return [a for a in AXES if getattr(self, a) is not None]

    def matches(self, cell: Cell) -> bool:
        for axis in self.given_axes():
            want = getattr(self, axis)
            if axis == "workload":
                if not want.matches(cell.workload):
                    return False
            elif getattr(cell, axis) != want:
                return False
        return True


class Limits(BaseModel):
    """Bounds on a matrix's size; an experiment that means more raises them explicitly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cells: Int = Field(default=10_000, ge=1, le=10_000_000,
                       description="combinations of the axes, before exclude")
    repetitions: Int = Field(default=1000, ge=1, le=1_000_000)
    runs: Int = Field(default=100_000, ge=1, le=10_000_000,
                      description="cells x repetitions")


MIN_ADAPTIVE_REPETITIONS = 5
Fraction = Annotated[float, Strict(), Field(gt=0, lt=1)]


class AdaptiveRepetitions(BaseModel):
    """`repetitions: {min: 5, max: 12, target_cv: 0.05, metric: window.throughput}` (#11).

    After `min` rounds, further rounds run over the cells whose coefficient of
    variation of `metric` (sample sd / mean over the repetitions so far) is above
    `target_cv`, until it is within target or `max` repetitions are reached. The
    metric is a tidy-table name recorded with each repetition; left out, it is
    `window.throughput` where the repetitions record it and netperf's `throughput`
    otherwise.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: Int = Field(default=MIN_ADAPTIVE_REPETITIONS, ge=MIN_ADAPTIVE_REPETITIONS,
                     description="a CV from fewer than 5 repetitions is too noisy to stop on")
    max: Int = Field(default=12, ge=MIN_ADAPTIVE_REPETITIONS)
    target_cv: Fraction = 0.05
    metric: Text | None = None

    @model_validator(mode="after")
    def _order(self) -> AdaptiveRepetitions:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min}); "
                             f"write e.g. {{min: {self.min}, max: {max(self.min, 12)}}}")
        return self


def _repetitions_form(value: Any) -> str:
    return "@adaptive" if isinstance(value, dict | AdaptiveRepetitions) else "@fixed"


# One error for one mistake: a mapping is checked as the adaptive form only. Tags start
# with '@' so error paths can drop them (testbed.experiment.yamlload).
Repetitions = Annotated[
    Annotated[Annotated[int, Strict(), Field(ge=1)], Tag("@fixed")]
    | Annotated[AdaptiveRepetitions, Tag("@adaptive")],
    Discriminator(_repetitions_form)]


class Experiment(BaseModel):
    """A whole experiment file, validated; `source`, `policies_path` say where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Text
    description: Text = ""
    axes: Axes = Field(default_factory=Axes)
    include: list[Combination] = Field(default_factory=list, max_length=MAX_ENTRIES)
    exclude: list[Combination] = Field(default_factory=list, max_length=MAX_ENTRIES)
    repetitions: Repetitions = Field(
        default=3, description="a number, or {min, max, target_cv, metric} (adaptive)")
    duration: Int = Field(default=10, ge=1, le=3600, description="measured seconds per rep")
    warmup: Int = Field(default=2, ge=0, le=600, description="seconds before measuring")
    order: OrderName = "interleaved"
    seed: Int = Field(default=0, ge=-(2**63), le=2**63 - 1)
    counters: list[CounterName] = Field(default_factory=_default_counters, min_length=1)
    plain_repetitions: Int = Field(
        default=1, ge=0, le=1000,
        description="plugin-less repetitions per cell when the cache model counts")
    tracing: Bool = Field(
        default=True,
        description="in-guest tracepoints for locality and wake-ups (never in cache-model "
                    "windows); off saves their cost and gives not-supported rows")
    retries: Int = Field(default=2, ge=0, le=20)
    memory_mb: Int | None = Field(default=None, ge=128, le=65536)
    policies_file: Text | None = None
    kernels_file: Text | None = Field(
        default=None, description="the kernel variants the kernel axis names (default "
                                  "configs/kernels.yaml), relative to this file")
    limits: Limits = Field(default_factory=Limits)

    _source: Path | None = PrivateAttr(default=None)
    _source_text: str | None = PrivateAttr(default=None)
    _policies_path: Path | None = PrivateAttr(default=None)
    _policies: PolicySet | None = PrivateAttr(default=None)
    _kernels: KernelSet | None = PrivateAttr(default=None)
    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("tracing", mode="before")
    @classmethod
    def _tracing(cls, v: Any) -> Any:
        return _gro_bool(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = name_problem(v)
        if problem:
            raise ValueError(f"name {v[:40]!r}{'...' if len(v) > 40 else ''} {problem}")
        return v

    @field_validator("counters")
    @classmethod
    def _unique_counters(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("counters lists a value twice")
        if "auto" in v and len(v) > 1:
            raise ValueError("`auto` chooses the sources itself (TCG: cache model; KVM: "
                             "hardware events where the guest has a PMU, else software); "
                             "write `counters: [auto]` or name the sources without it")
        return v

    @property
    def adaptive(self) -> AdaptiveRepetitions | None:
        """The adaptive stopping rule, or None for a fixed number of repetitions."""
        return self.repetitions if isinstance(self.repetitions, AdaptiveRepetitions) else None

    @property
    def min_repetitions(self) -> int:
        """Repetitions every cell gets (all of them for a fixed number)."""
        a = self.adaptive
        return a.min if a else self._fixed()

    @property
    def max_repetitions(self) -> int:
        """The most repetitions a cell may get (what limits and --dry-run estimates use)."""
        a = self.adaptive
        return a.max if a else self._fixed()

    @property
    def may_use_cachemodel(self) -> bool:
        """Whether the counters can resolve to the cache model (auto does on TCG hosts):
        then every cell also gets `plain_repetitions` without the plugin."""
        return bool({"auto", "cachemodel"} & set(self.counters))

    def _fixed(self) -> int:
        assert isinstance(self.repetitions, int)
        return self.repetitions

    def repetitions_text(self, plain: int | None = None) -> str:
        """How many repetitions a cell gets; `plain` (when the cache model counts) adds
        the plugin-less ones."""
        a = self.adaptive
        text = (f"{self.repetitions} repetitions" if a is None else
                f"{a.min}-{a.max} repetitions (adaptive: more while CV of "
                f"{a.metric or 'throughput'} > {a.target_cv:g})")
        if plain:
            text += f" + {plain} plain (no plugin)"
        return text

    @property
    def source(self) -> Path | None:
        """The file this experiment was loaded from (None when built in code)."""
        return self._source

    @property
    def source_text(self) -> str | None:
        """The file's text as validated (what a run keeps as experiment.yaml)."""
        return self._source_text

    @property
    def policies_path(self) -> Path | None:
        """The policies file validation used, resolved (`~` expanded, relative to the file)."""
        return self._policies_path

    @property
    def policies(self) -> PolicySet:
        """The policy set the experiment was validated against."""
        if self._policies is None:
            self._policies = load_policies()
        return self._policies

    @property
    def kernels(self) -> KernelSet:
        """The kernel variants the experiment was validated against."""
        if self._kernels is None:
            self._kernels = load_kernels()
        return self._kernels

    @property
    def warnings(self) -> tuple[str, ...]:
        """Things accepted but probably not meant (an exclude that matches no cell)."""
        return self._warnings
