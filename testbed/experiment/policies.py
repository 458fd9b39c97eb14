"""Receive-path policies: data in configs/policies.yaml -> guest shell commands (pure).

A policy says where the NIC's interrupts go (X), where the reader runs (Y) and
how RPS/RFS and sysctls steer the softirq work between them. Policies are data,
so a user adds one to configs/policies.yaml without touching code.

Every policy writes the *whole* state it controls, including "off" values
(rps_cpus 0, flow tables 0, IRQ affinity back to all CPUs): boots are reused
across cells and repetitions, so a policy must never inherit what the previous
one left behind. `readback_commands` + `parse_readback` + `diff_readback` prove
that the state the guest ended up in is the state that was asked for (the read-back
format is testbed.formats.readback; the comparison testbed.experiment.nicstate).

CPU spec language (fields `irq_cpus`, `reader_cpu`, `rps_cpus`), resolved per
cell against its vCPU count N:

    3         CPU 3                     0-2      CPUs 0, 1 and 2
    last      CPU N-1                   all      CPUs 0 .. N-1
    same-as-irq   the CPU(s) the NIC IRQs are pinned to
    other     a CPU other than the IRQ CPUs: the highest one not among them
    [0, last] a list combines tokens (a comma-separated string works too)

`irq_cpus` also takes `default` (the kernel's own choice: affinity to all
CPUs); `reader_cpu` also takes `any` (the reader is not pinned) and must name
exactly one CPU otherwise; `rps_cpus: null` turns RPS off.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from testbed.errors import ConfigError, NetbedError
from testbed.experiment.kernelfile import KernelSet, check_kernel_names
from testbed.experiment.yamlload import (
    Source,
    cut,
    display_path,
    load_yaml,
    parse_yaml,
    plain,
    raise_problems,
    shown,
    validation_problems,
)
from testbed.formats.readback import IFACE_RE, SYSCTL_RE, cpu_mask, fmt_cpulist, sysctl_path
from testbed.settings import CONFIGS_DIR

DEFAULT_POLICIES_FILE = CONFIGS_DIR / "policies.yaml"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
MAX_POLICY_NAME = 64         # part of every cell id, and so of a folder name (NAME_MAX)
MAX_CPU = 1023               # the highest CPU number a spec may name
MAX_SYSCTL_VALUE = 4096
_INT_RE = re.compile(r"^[0-9]+$")
_RANGE_RE = re.compile(r"^([0-9]+)-([0-9]+)$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_WORDS = ("last", "all", "same-as-irq", "other")

Int = Annotated[int, Strict()]
Text = Annotated[str, Strict()]

CpuSpec = tuple[str, ...]


def _normalize_spec(value: Any) -> CpuSpec:
    """int | str | list -> tuple of tokens; bad types get a message naming the language."""
    items: list[Any]
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a CPU spec (e.g. 0, last, all, [0, 1]), got {value!r}")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        items = [t.strip() for t in value.split(",") if t.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"expected a CPU spec, got {type(value).__name__}")
    tokens: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"bad CPU token {shown(item)} (allowed: integers, ranges like "
                             "0-2, last, all, ...)")
        if isinstance(item, int) and not 0 <= item <= MAX_CPU:
            raise ValueError(f"CPU numbers run from 0 to {MAX_CPU}, got {item}")
        tokens.append(str(item).strip())
    if not tokens:
        raise ValueError("empty CPU spec")
    return tuple(tokens)


def _check_tokens(tokens: CpuSpec, extra_words: tuple[str, ...] = (),
                  forbidden: tuple[str, ...] = ()) -> None:
    words = tuple(w for w in (*_WORDS, *extra_words) if w not in forbidden)
    for t in tokens:
        if _INT_RE.match(t):
            _cpu_number(t)
            continue
        m = _RANGE_RE.match(t)
        if m:
            if _cpu_number(m.group(1)) > _cpu_number(m.group(2)):
                raise ValueError(f"range {t!r} runs backwards")
            continue
        if t in words:
            if t in extra_words and len(tokens) > 1:
                raise ValueError(f"{t!r} cannot be combined with other CPUs")
            continue
        raise ValueError(f"unknown CPU token {shown(t)} (allowed: integers, ranges like 0-2, "
                         f"{', '.join(words)})")


def _cpu_number(digits: str) -> int:
    """ASCII digits -> a CPU number; past MAX_CPU (or absurdly long) is a ValueError."""
    if len(digits) > 4 or int(digits) > MAX_CPU:
        raise ValueError(f"CPU numbers run from 0 to {MAX_CPU}, got {cut(digits, 20)}")
    return int(digits)


def _sysctl_map(v: Any) -> dict[str, str]:
    """YAML mapping -> {dotted name: value as text}; numbers are fine, names are checked."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of sysctl name to value, e.g. {net.core.busy_read: 0}")
    out: dict[str, str] = {}
    for k, val in v.items():
        if not isinstance(k, str) or not SYSCTL_RE.match(k) or len(k) > 200:
            raise ValueError(f"bad sysctl name {shown(k)} (write it dotted, e.g. "
                             "net.core.busy_read)")
        if isinstance(val, bool):
            raise ValueError(f"sysctl {k}: {shown(val)} is not a sysctl value; write 1 or 0")
        if not isinstance(val, (str, int)):
            raise ValueError(f"sysctl {k}: value must be a number or a one-line string, "
                             f"not {shown(val)}")
        text = str(val)
        if _CONTROL_RE.search(text) or len(text) > MAX_SYSCTL_VALUE:
            raise ValueError(f"sysctl {k}: value must be one line of at most "
                             f"{MAX_SYSCTL_VALUE} characters without control characters "
                             "(NUL, CR, tab, ...)")
        out[k] = text
    return out


class Policy(BaseModel):
    """One receive-path policy, as written in configs/policies.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Text
    description: Text = ""
    requires_kernel: list[Text] | None = None
    min_cpus: Int = Field(default=1, ge=1, le=MAX_CPU + 1)
    irq_cpus: CpuSpec = ("default",)
    reader_cpu: CpuSpec = ("any",)
    rps_cpus: CpuSpec | None = None
    rps_sock_flow_entries: Int | None = Field(default=None, ge=0, le=1 << 29)
    rps_flow_cnt: Int | None = Field(default=None, ge=0, le=1 << 29)
    sysctls: dict[str, str] = Field(default_factory=dict)
    sysctls_if_present: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v) or len(v) > MAX_POLICY_NAME:
            raise ValueError(f"policy name {shown(v)} must be lowercase letters, digits and '-',"
                             f" at most {MAX_POLICY_NAME} (it becomes part of cell ids and "
                             "folder names)")
        return v

    @field_validator("requires_kernel")
    @classmethod
    def _kernels(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("an empty list allows no kernel; omit the key "
                             "to allow every kernel")
        # the experiment's kernels file (validation context) and configs/kernels.yaml
        if problem := check_kernel_names(v, (info.context or {}).get("kernels")):
            raise ValueError(problem)
        return v

    @field_validator("irq_cpus", mode="before")
    @classmethod
    def _irq(cls, v: Any) -> CpuSpec:
        tokens = _normalize_spec(v)
        _check_tokens(tokens, extra_words=("default",),
                      forbidden=("same-as-irq", "other"))
        return tokens

    @field_validator("reader_cpu", mode="before")
    @classmethod
    def _reader(cls, v: Any) -> CpuSpec:
        tokens = _normalize_spec(v)
        _check_tokens(tokens, extra_words=("any",), forbidden=("all",))
        if len(tokens) != 1 or _RANGE_RE.match(tokens[0]):
            raise ValueError("name exactly one CPU (netperf pins the reader to one "
                             "CPU), or 'any'")
        return tokens

    @field_validator("rps_cpus", mode="before")
    @classmethod
    def _rps(cls, v: Any) -> CpuSpec | None:
        if v is None:
            return None
        tokens = _normalize_spec(v)
        _check_tokens(tokens)
        return tokens

    @field_validator("rps_sock_flow_entries", "rps_flow_cnt")
    @classmethod
    def _pow2(cls, v: int | None) -> int | None:
        # The kernel rounds both up to a power of two; asking for exactly what it
        # will report keeps the read-back comparison honest.
        if v is not None and v != 0 and v & (v - 1):
            raise ValueError(f"{v} is not a power of two (the kernel rounds it up to "
                             f"{1 << (v - 1).bit_length()}; write that)")
        return v

    @field_validator("sysctls", "sysctls_if_present", mode="before")
    @classmethod
    def _sysctls(cls, v: Any) -> dict[str, str]:
        return _sysctl_map(v)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        relative = {"same-as-irq", "other"} & {*self.reader_cpu, *(self.rps_cpus or ())}
        if relative and self.irq_cpus == ("default",):
            raise ValueError("'same-as-irq' and 'other' need irq_cpus pinned to CPUs; "
                                 "with irq_cpus: default the IRQ may land on any CPU")
        both = set(self.sysctls) & set(self.sysctls_if_present)
        if both:
            raise ValueError(f"sysctl {sorted(both)[0]} is in both sysctls and "
                             "sysctls_if_present; keep one")
        return self


class Baseline(BaseModel):
    """Settings every policy starts from (a policy's own values win).

    This is where a knob that only some kernels have gets its "off" value, e.g.
    `net.core.rx_wake_local: 0` under `sysctls_if_present`, so a new policy
    cannot forget to reset it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sysctls: dict[str, str] = Field(default_factory=dict)
    sysctls_if_present: dict[str, str] = Field(default_factory=dict)

    @field_validator("sysctls", "sysctls_if_present", mode="before")
    @classmethod
    def _sysctls(cls, v: Any) -> dict[str, str]:
        return _sysctl_map(v)


class PolicySet(BaseModel):
    """All policies of one policies.yaml, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    baseline: Baseline = Field(default_factory=Baseline)
    policies: dict[str, Policy]

    @model_validator(mode="before")
    @classmethod
    def _names(cls, data: Any) -> Any:
        """The mapping key is the policy's name; `name:` inside is optional."""
        if isinstance(data, dict) and isinstance(data.get("policies"), dict):
            pols = {}
            for key, body in data["policies"].items():
                if isinstance(body, dict):
                    body = {"name": key, **body}
                elif body is None:
                    body = {"name": key}
                pols[key] = body
            data = {**data, "policies": pols}
        return data

    @model_validator(mode="after")
    def _keys_match(self) -> PolicySet:
        for key, pol in self.policies.items():
            if pol.name != key:
                raise ValueError(f"policy {key!r} has name {pol.name!r}; drop `name:` "
                                 "(the key is the name)")
        if not self.policies:
            raise ValueError("no policies defined")
        return self

    @property
    def names(self) -> list[str]:
        return list(self.policies)

    def __contains__(self, name: object) -> bool:
        return name in self.policies

    def __getitem__(self, name: str) -> Policy:
        try:
            return self.policies[name]
        except KeyError:
            raise NetbedError(f"unknown policy {name!r}",
                              hint=f"use one of: {', '.join(self.names)}") from None

    def get(self, name: str) -> Policy | None:
        return self.policies.get(name)

    def resolve(self, name: str, cpus: int) -> ResolvedPolicy:
        """`resolve()` with this set's baseline sysctls merged in."""
        return resolve(self[name], cpus, baseline=self.baseline)


def load_policies(path: Path = DEFAULT_POLICIES_FILE,
                  kernels: KernelSet | None = None) -> PolicySet:
    """Load and validate a policies file; every problem is reported at its file:line:col.
    `requires_kernel` names are checked against `kernels` (default configs/kernels.yaml)."""
    return _policies_from(load_yaml(path), kernels)


def loads_policies(data: bytes, path: Path, kernels: KernelSet | None = None) -> PolicySet:
    """`load_policies` for a document already in memory; `path` names it in messages."""
    return _policies_from(parse_yaml(data, path), kernels)


def _policies_from(src: Source, kernels: KernelSet | None = None) -> PolicySet:
    data = plain(src)
    if src.empty or not isinstance(data, dict):
        raise ConfigError(f"{src.name}:1:1: expected a mapping with a `policies:` key",
                          hint=f"see {display_path(DEFAULT_POLICIES_FILE)}")
    try:
        return PolicySet.model_validate(data, context={"kernels": kernels})
    except ValidationError as e:
        raise_problems(validation_problems(src, e, PolicySet))
        raise  # pragma: no cover - raise_problems always raises for a non-empty list


@dataclass(frozen=True)
class ResolvedPolicy:
    """A policy made concrete for a cell's vCPU count: exact CPU lists and values."""

    name: str
    cpus: int
    irq_cpus: tuple[int, ...]          # all CPUs when the policy says `default`
    irq_default: bool
    reader_cpu: int | None             # None: the reader is not pinned
    rps_cpus: tuple[int, ...]          # empty: RPS off
    rps_sock_flow_entries: int
    rps_flow_cnt: int
    sysctls: dict[str, str] = field(default_factory=dict)
    sysctls_if_present: dict[str, str] = field(default_factory=dict)

    @property
    def rps_mask(self) -> str:
        return cpu_mask(self.rps_cpus)

    @property
    def sysctl_keys(self) -> list[str]:
        """Every sysctl this policy sets (the read-back reads these)."""
        return sorted({"net.core.rps_sock_flow_entries", *self.sysctls, *self.sysctls_if_present})

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "cpus": self.cpus, "irq_cpus": list(self.irq_cpus),
            "irq_default": self.irq_default, "reader_cpu": self.reader_cpu,
            "rps_cpus": list(self.rps_cpus), "rps_mask": self.rps_mask,
            "rps_sock_flow_entries": self.rps_sock_flow_entries,
            "rps_flow_cnt": self.rps_flow_cnt, "sysctls": dict(self.sysctls),
            "sysctls_if_present": dict(self.sysctls_if_present),
        }


def _expand_tokens(tokens: CpuSpec, cpus: int, irq: tuple[int, ...] | None,
                   what: str, policy: str) -> tuple[int, ...]:
    out: set[int] = set()
    for t in tokens:
        if _INT_RE.match(t):
            wanted = {int(t)}
        elif m := _RANGE_RE.match(t):
            wanted = set(range(int(m.group(1)), int(m.group(2)) + 1))
        elif t == "last":
            wanted = {cpus - 1}
        elif t == "all":
            wanted = set(range(cpus))
        elif t == "same-as-irq":
            assert irq is not None
            wanted = set(irq)
        elif t == "other":
            assert irq is not None
            rest = [c for c in range(cpus) if c not in irq]
            if not rest:
                raise ConfigError(f"policy {policy!r}: {what} 'other' needs a CPU besides the "
                                  f"IRQ CPUs {fmt_cpulist(irq)}, but the cell has {cpus} CPU(s)")
            wanted = {rest[-1]}
        else:  # pragma: no cover - tokens were checked when the policy was loaded
            raise ConfigError(f"policy {policy!r}: {what}: unknown token {t!r}")
        too_big = sorted(c for c in wanted if c >= cpus)
        if too_big:
            raise ConfigError(f"policy {policy!r}: {what} names CPU {too_big[0]}, but the cell "
                              f"has {cpus} CPU(s) (0-{cpus - 1})")
        out |= wanted
    return tuple(sorted(out))


def resolve(policy: Policy, cpus: int, baseline: Baseline | None = None) -> ResolvedPolicy:
    """Concrete CPUs for `cpus` vCPUs; ConfigError when the cell cannot satisfy the policy."""
    if cpus < 1:
        raise ConfigError(f"a cell needs at least 1 CPU, got {cpus}")
    if cpus < policy.min_cpus:
        raise ConfigError(f"policy {policy.name!r} needs at least {policy.min_cpus} CPUs, "
                          f"the cell has {cpus}")
    irq_default = policy.irq_cpus == ("default",)
    irq = (tuple(range(cpus)) if irq_default
           else _expand_tokens(policy.irq_cpus, cpus, None, "irq_cpus", policy.name))
    reader: int | None = None
    if policy.reader_cpu != ("any",):
        got = _expand_tokens(policy.reader_cpu, cpus, irq, "reader_cpu", policy.name)
        if len(got) != 1:
            raise ConfigError(f"policy {policy.name!r}: reader_cpu resolves to "
                              f"{fmt_cpulist(got)}, not one CPU")
        reader = got[0]
    rps = (() if policy.rps_cpus is None
           else _expand_tokens(policy.rps_cpus, cpus, irq, "rps_cpus", policy.name))
    base = baseline or Baseline()
    sysctls = {**base.sysctls, **policy.sysctls}
    if_present = {k: v for k, v in {**base.sysctls_if_present, **policy.sysctls_if_present}.items()
                  if k not in sysctls}
    for k in policy.sysctls_if_present:  # the policy's "if present" beats a baseline "must"
        if k in base.sysctls and k not in policy.sysctls:
            sysctls.pop(k)
            if_present[k] = policy.sysctls_if_present[k]
    return ResolvedPolicy(
        name=policy.name, cpus=cpus, irq_cpus=irq, irq_default=irq_default, reader_cpu=reader,
        rps_cpus=rps, rps_sock_flow_entries=policy.rps_sock_flow_entries or 0,
        rps_flow_cnt=policy.rps_flow_cnt or 0, sysctls=dict(sorted(sysctls.items())),
        sysctls_if_present=dict(sorted(if_present.items())),
    )


def netserver_cpu(resolved: ResolvedPolicy) -> int | None:
    """The CPU for netperf's `-T ,<cpu>` (binds netserver's data process), or None."""
    return resolved.reader_cpu


# ---------------------------------------------------------------- guest commands

def _queue_dir(iface: str, queue: str) -> str:
    return f"/sys/class/net/{iface}/queues/{queue}"


def apply_commands(resolved: ResolvedPolicy, iface: str, irqs: Sequence[int],
                   rx_queues: Sequence[str], *, gro: bool | None = None) -> list[str]:
    """Guest shell commands that put the receive path into `resolved`'s state.

    Writes every knob, "off" values included, so the result does not depend on
    what ran before. `rx_queues` are the names under /sys/class/net/<iface>/queues
    (e.g. ["rx-0"]); `gro` (the cell's axis) adds an `ethtool -K` when given.
    """
    if not IFACE_RE.match(iface):
        raise NetbedError(f"bad interface name {iface!r}")
    bad = [q for q in rx_queues if not re.match(r"^rx-\d+$", q)]
    if bad:
        raise NetbedError(f"bad rx queue name {bad[0]!r}", hint="pass names like 'rx-0'")
    cmds: list[str] = []
    affinity = fmt_cpulist(resolved.irq_cpus)
    for irq in irqs:
        cmds.append(f"echo {affinity} > /proc/irq/{int(irq)}/smp_affinity_list")
    cmds.append(f"echo {resolved.rps_sock_flow_entries} > "
                f"{sysctl_path('net.core.rps_sock_flow_entries')}")
    for q in rx_queues:
        cmds.append(f"echo {resolved.rps_mask} > {_queue_dir(iface, q)}/rps_cpus")
        cmds.append(f"echo {resolved.rps_flow_cnt} > {_queue_dir(iface, q)}/rps_flow_cnt")
    for k, v in resolved.sysctls.items():
        cmds.append(f"sysctl -q -w {shlex.quote(f'{k}={v}')}")
    for k, v in resolved.sysctls_if_present.items():
        cmds.append(f"if [ -e {sysctl_path(k)} ]; then sysctl -q -w {shlex.quote(f'{k}={v}')}; fi")
    if gro is not None:
        cmds.append(f"ethtool -K {iface} gro {'on' if gro else 'off'}")
    return cmds


def apply_script(resolved: ResolvedPolicy, iface: str, irqs: Sequence[int],
                 rx_queues: Sequence[str], *, gro: bool | None = None) -> str:
    """`apply_commands` as one script that stops at the first failing write."""
    return "set -eu\n" + "\n".join(apply_commands(resolved, iface, irqs, rx_queues, gro=gro)) + "\n"
