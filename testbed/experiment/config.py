"""Experiment YAML -> validated models (Experiment, Cell); every error names file:line:col.

An experiment is a matrix: the cartesian product of its axes (kernel, nic,
cpus, policy, workload, gro), minus `exclude` entries, plus `include` entries,
with GitHub Actions matrix semantics adapted to cells whose fields are all fixed:

- `exclude` is applied first: it removes every combination that matches all of
  the entry's keys (a workload written without a size, e.g. `TCP_RR`, matches
  every size of that workload).
- `include` comes after `exclude` (so it can add back an excluded combination).
  An entry that matches an existing combination on all its keys would only
  "extend" it, and every key is already an axis, so it changes nothing. An entry
  that matches none adds a new cell; axes it does not name take the axis's
  FIRST value (GitHub would leave them unset; a cell needs every field).

Validation happens before anything runs, and reports every problem at once,
one line each: `configs/x.yaml:12:5: axes.policy[2]: unknown policy 'rsf' ...`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from testbed.errors import ConfigError
from testbed.experiment.policies import DEFAULT_POLICIES_FILE, PolicySet, load_policies
from testbed.experiment.yamlload import (
    Problem,
    Source,
    did_you_mean,
    load_yaml,
    plain,
    raise_problems,
    validation_problems,
)

KernelName = Literal["distro", "stock", "patched"]
NicName = Literal["e1000", "virtio", "virtio-nocsum"]
WorkloadName = Literal["TCP_STREAM", "TCP_MAERTS", "TCP_RR"]
CounterName = Literal["software", "hardware", "cachemodel"]
OrderName = Literal["sequential", "interleaved", "random"]

WORKLOAD_NAMES: tuple[str, ...] = ("TCP_STREAM", "TCP_MAERTS", "TCP_RR")
NIC_NAMES: tuple[str, ...] = ("e1000", "virtio", "virtio-nocsum")
AXES: tuple[str, ...] = ("kernel", "nic", "cpus", "policy", "workload", "gro")
# Send size for the bulk workloads (netperf -m), request = response size for RR.
DEFAULT_MESSAGE_SIZE = {"TCP_STREAM": 16384, "TCP_MAERTS": 16384, "TCP_RR": 1}
MAX_CPUS = 64

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _parse_workload_text(value: Any, *, sized: bool) -> Any:
    """'TCP_RR:1' -> {'name': 'TCP_RR', 'message_size': 1}; mappings pass through."""
    if isinstance(value, str):
        name, sep, size = value.partition(":")
        out: dict[str, Any] = {"name": name.strip()}
        if sep:
            size = size.strip()
            if not size.isdigit():
                raise ValueError(f"workload {value!r}: the size after ':' must be a whole number "
                                 "of bytes, e.g. TCP_RR:1")
            out["message_size"] = int(size)
        elif sized:
            out["message_size"] = DEFAULT_MESSAGE_SIZE.get(out["name"], 1)
        return out
    if isinstance(value, dict):
        if sized and "message_size" not in value and value.get("name") in DEFAULT_MESSAGE_SIZE:
            return {**value, "message_size": DEFAULT_MESSAGE_SIZE[value["name"]]}
        return value
    raise ValueError(f"a workload is written 'TCP_STREAM', 'TCP_RR:1' or "
                     f"{{name: TCP_RR, message_size: 1}}, not {value!r}")


class Workload(BaseModel):
    """What netperf runs: the test and its message size in bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: WorkloadName
    message_size: int = Field(ge=1, le=16 * 1024 * 1024)

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
    message_size: int | None = Field(default=None, ge=1, le=16 * 1024 * 1024)

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
    """YAML 1.2 leaves `on`/`off` as strings; accept them (and true/false) for GRO."""
    if isinstance(value, str) and value.strip().lower() in ("on", "off"):
        return value.strip().lower() == "on"
    return value


class Cell(BaseModel):
    """One point of the matrix: one pair of guests configured one way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: KernelName
    nic: NicName
    cpus: int = Field(ge=1, le=MAX_CPUS)
    policy: str
    workload: Workload
    gro: bool

    @field_validator("gro", mode="before")
    @classmethod
    def _gro(cls, v: Any) -> Any:
        return _gro_bool(v)

    @property
    def cell_id(self) -> str:
        """Readable, filesystem-safe and injective (policy names are lowercase, workloads not)."""
        return (f"{self.kernel}-{self.nic}-c{self.cpus}-{self.policy}-{self.workload.id}-"
                f"gro_{'on' if self.gro else 'off'}")

    @property
    def boot_key(self) -> tuple[str, str, int]:
        """Cells with equal boot keys can share a booted pair of guests (policy/GRO reset)."""
        return (self.kernel, self.nic, self.cpus)

    def flat(self) -> dict[str, Any]:
        """One flat row (for tables, cells.json consumers and analysis)."""
        return {"cell_id": self.cell_id, "kernel": self.kernel, "nic": self.nic,
                "cpus": self.cpus, "policy": self.policy, "workload": self.workload.name,
                "message_size": self.workload.message_size, "gro": self.gro}


def _as_list(v: Any) -> Any:
    """An axis written as a single value means a one-value axis."""
    return v if isinstance(v, list) else [v]


class Axes(BaseModel):
    """The matrix axes; an axis left out has one value, the one shown here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: list[KernelName] = Field(default_factory=lambda: ["distro"], min_length=1)
    nic: list[NicName] = Field(default_factory=lambda: ["virtio"], min_length=1)
    cpus: list[Annotated[int, Field(ge=1, le=MAX_CPUS)]] = Field(
        default_factory=lambda: [2], min_length=1)
    policy: list[str] = Field(default_factory=lambda: ["default"], min_length=1)
    workload: list[Workload] = Field(
        default_factory=lambda: [Workload(name="TCP_STREAM", message_size=16384)], min_length=1)
    gro: list[bool] = Field(default_factory=lambda: [True], min_length=1)

    @field_validator("kernel", "nic", "cpus", "policy", "workload", "gro", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return _as_list(v)

    @field_validator("gro", mode="before")
    @classmethod
    def _gro(cls, v: Any) -> Any:
        return [_gro_bool(x) for x in _as_list(v)]


class Combination(BaseModel):
    """An include/exclude entry: some axes with one value each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: KernelName | None = None
    nic: NicName | None = None
    cpus: int | None = Field(default=None, ge=1, le=MAX_CPUS)
    policy: str | None = None
    workload: WorkloadMatch | None = None
    gro: bool | None = None

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
                             f"{{nic: e1000, policy: pin-cross}}, got {v!r}")
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


class Experiment(BaseModel):
    """A whole experiment file, validated. `source` and `policies` say where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    axes: Axes = Field(default_factory=Axes)
    include: list[Combination] = Field(default_factory=list)
    exclude: list[Combination] = Field(default_factory=list)
    repetitions: int = Field(default=3, ge=1, le=1000)
    duration: int = Field(default=10, ge=1, le=3600, description="measured seconds per rep")
    warmup: int = Field(default=2, ge=0, le=600, description="seconds before measuring")
    order: OrderName = "interleaved"
    seed: int = 0
    counters: list[CounterName] = Field(default_factory=lambda: ["software"], min_length=1)
    retries: int = Field(default=2, ge=0, le=20)
    memory_mb: int | None = Field(default=None, ge=128, le=65536)
    policies_file: str | None = None

    _source: Path | None = PrivateAttr(default=None)
    _policies: PolicySet | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"name {v!r} must be letters, digits, '_', '.', '-' "
                             "(it becomes part of the run id)")
        return v

    @field_validator("counters")
    @classmethod
    def _unique_counters(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("counters lists a value twice")
        return v

    @property
    def source(self) -> Path | None:
        """The file this experiment was loaded from (None when built in code)."""
        return self._source

    @property
    def policies(self) -> PolicySet:
        """The policy set the experiment was validated against."""
        if self._policies is None:
            self._policies = load_policies()
        return self._policies


def _resolve_policies_path(exp_path: Path, value: str | None) -> Path:
    if value is None:
        return DEFAULT_POLICIES_FILE
    p = Path(value).expanduser()
    return p if p.is_absolute() else (exp_path.parent / p)


def load_experiment(path: Path, policies: PolicySet | None = None) -> Experiment:
    """Load, validate and cross-check an experiment file; ConfigError lists every problem.

    `policies` defaults to the file named by the experiment's `policies_file`
    (relative to the experiment), else configs/policies.yaml.
    """
    path = Path(path)
    src = load_yaml(path)
    data = plain(src.tree)
    if not isinstance(data, dict):
        raise ConfigError(f"{src.name}:1:1: expected a mapping of keys (name, axes, ...), "
                          f"got {type(data).__name__}")
    data.setdefault("name", path.stem)
    # Top-level `x-...` keys are ignored (as in docker compose): a place for YAML
    # anchors that other keys merge in with `<<: *name`.
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    if policies is None:
        pfile = data.get("policies_file")
        ppath = _resolve_policies_path(path, pfile if isinstance(pfile, str) else None)
        if isinstance(pfile, str) and not ppath.is_file():
            raise_problems([src.problem(("policies_file",), f"no such file: {ppath} (the "
                                        "path is relative to this experiment file)")])
        policies = load_policies(ppath)
    # Policy names are checked on the raw data too, so a typo in a policy is
    # reported together with every other problem, not after they are fixed.
    problems = _policy_name_problems(src, data, policies)
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise_problems(problems + validation_problems(src, e, Experiment))
        raise  # pragma: no cover
    raise_problems(problems or check_experiment(exp, policies, src))
    exp._source = path
    exp._policies = policies
    return exp


def _policy_name_problems(src: Source, data: dict[str, Any], policies: PolicySet) -> list[Problem]:
    found: list[tuple[tuple[str | int, ...], Any]] = []
    axes = data.get("axes")
    if isinstance(axes, dict) and "policy" in axes:
        values = axes["policy"]
        if isinstance(values, list):
            found += [(("axes", "policy", i), v) for i, v in enumerate(values)]
        else:
            found.append((("axes", "policy"), values))
    for section in ("include", "exclude"):
        entries = data.get(section)
        if isinstance(entries, list):
            found += [((section, j, "policy"), e["policy"]) for j, e in enumerate(entries)
                      if isinstance(e, dict) and e.get("policy") is not None]
    allowed = ", ".join(policies.names)
    return [src.problem(loc, f"unknown policy {name!r} (allowed: {allowed})"
                        + did_you_mean(str(name), policies.names))
            for loc, name in found if not (isinstance(name, str) and name in policies)]


def check_experiment(exp: Experiment, policies: PolicySet, src: Source) -> list[Problem]:
    """Cross checks pydantic cannot do alone: policies exist and fit every surviving cell."""
    from testbed.experiment.matrix import expand_with_origin  # matrix imports this module

    problems: list[Problem] = []
    for axis in AXES:  # duplicates would make two identical cells
        values = getattr(exp.axes, axis)
        seen: set[Any] = set()
        for i, v in enumerate(values):
            if v in seen:
                problems.append(src.problem(("axes", axis, i), f"{v!s} appears twice"))
            seen.add(v)
    problems += _policy_name_problems(src, exp.model_dump(), policies)
    if problems:
        return problems

    cells = expand_with_origin(exp)
    if not cells:
        return [src.problem(("exclude",), "the matrix is empty: exclude removes every "
                            "combination")]
    # Group impossible cells by (reason, location) so a mistake in a big matrix is
    # one line, not hundreds.
    groups: dict[tuple[str, tuple[str | int, ...]], list[str]] = {}
    messages: dict[tuple[str, tuple[str | int, ...]], str] = {}
    for cell, origin in cells:
        policy = policies[cell.policy]
        loc: tuple[str | int, ...] = (
            ("axes", "policy", exp.axes.policy.index(cell.policy)) if origin is None
            else ("include", origin))
        fix_k = (f"add `{{policy: {cell.policy}, kernel: {cell.kernel}}}` to exclude"
                 if origin is None else "change or remove this include entry")
        fix_c = (f"add `{{policy: {cell.policy}, cpus: {cell.cpus}}}` to exclude"
                 if origin is None else "change or remove this include entry")
        if policy.requires_kernel and cell.kernel not in policy.requires_kernel:
            key = (f"k:{cell.policy}:{cell.kernel}", loc)
            groups.setdefault(key, []).append(cell.cell_id)
            messages[key] = (
                f"policy {cell.policy!r} needs kernel {' or '.join(policy.requires_kernel)}, "
                f"but a cell pairs it with kernel {cell.kernel!r}; {fix_k}")
        try:
            policies.resolve(cell.policy, cell.cpus)
        except ConfigError as e:
            key = (f"c:{cell.policy}:{cell.cpus}", loc)
            groups.setdefault(key, []).append(cell.cell_id)
            messages[key] = f"{e.message}; {fix_c}"
    for key, ids in groups.items():
        example = f" ({len(ids)} cell{'s' if len(ids) > 1 else ''}, e.g. {ids[0]})"
        problems.append(src.problem(key[1], messages[key] + example))
    return problems


def experiment_from_dict(data: dict[str, Any], policies: PolicySet,
                         source: Path | None = None) -> Experiment:
    """Build and check an experiment from plain data (tests, generated matrices)."""
    from ruamel.yaml.comments import CommentedMap

    src = Source(source or Path("<dict>"), CommentedMap())
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise_problems(validation_problems(src, e, Experiment))
        raise  # pragma: no cover
    raise_problems(check_experiment(exp, policies, src))
    exp._source = source
    exp._policies = policies
    return exp
