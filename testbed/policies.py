"""Receive-path policies: data in configs/policies.yaml -> guest shell commands (pure).

A policy says where the NIC's interrupts go (X), where the reader runs (Y) and
how RPS/RFS and sysctls steer the softirq work between them. Policies are data,
so a user adds one to configs/policies.yaml without touching code.

Every policy writes the *whole* state it controls, including "off" values
(rps_cpus 0, flow tables 0, IRQ affinity back to all CPUs): boots are reused
across cells and repetitions, so a policy must never inherit what the previous
one left behind. `readback_commands` + `parse_readback` + `diff_readback` prove
that the state the guest ended up in is the state that was asked for.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from testbed.errors import ConfigError, NetbedError
from testbed.settings import CONFIGS_DIR
from testbed.yamlload import Source, load_yaml, plain, raise_problems, validation_problems

DEFAULT_POLICIES_FILE = CONFIGS_DIR / "policies.yaml"
KERNEL_NAMES = ("distro", "stock", "patched")  # == testbed.kernels.KERNEL_NAMES (tested)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_SYSCTL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_INT_RE = re.compile(r"^\d+$")
_RANGE_RE = re.compile(r"^(\d+)-(\d+)$")
_WORDS = ("last", "all", "same-as-irq", "other")
ABSENT = "<absent>"

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
            raise ValueError(f"bad CPU token {item!r}")
        if isinstance(item, int) and item < 0:
            raise ValueError(f"CPU numbers start at 0, got {item}")
        tokens.append(str(item).strip())
    if not tokens:
        raise ValueError("empty CPU spec")
    return tuple(tokens)


def _check_tokens(tokens: CpuSpec, extra_words: tuple[str, ...] = (),
                  forbidden: tuple[str, ...] = ()) -> None:
    words = tuple(w for w in (*_WORDS, *extra_words) if w not in forbidden)
    for t in tokens:
        if _INT_RE.match(t):
            continue
        m = _RANGE_RE.match(t)
        if m:
            if int(m.group(1)) > int(m.group(2)):
                raise ValueError(f"range {t!r} runs backwards")
            continue
        if t in words:
            if t in extra_words and len(tokens) > 1:
                raise ValueError(f"{t!r} cannot be combined with other CPUs")
            continue
        raise ValueError(f"unknown CPU token {t!r} (allowed: integers, ranges like 0-2, "
                         f"{', '.join(words)})")


def _sysctl_map(v: Any) -> dict[str, str]:
    """YAML mapping -> {dotted name: value as text}; numbers are fine, names are checked."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of sysctl name to value, e.g. {net.core.busy_read: 0}")
    out: dict[str, str] = {}
    for k, val in v.items():
        if not isinstance(k, str) or not _SYSCTL_RE.match(k):
            raise ValueError(f"bad sysctl name {k!r} (write it dotted, e.g. net.core.busy_read)")
        if isinstance(val, bool):
            val = int(val)
        if not isinstance(val, (str, int)) or "\n" in str(val):
            raise ValueError(f"sysctl {k}: value must be a number or a one-line string")
        out[k] = str(val)
    return out


class Policy(BaseModel):
    """One receive-path policy, as written in configs/policies.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    requires_kernel: list[str] | None = None
    min_cpus: int = Field(default=1, ge=1, le=1024)
    irq_cpus: CpuSpec = ("default",)
    reader_cpu: CpuSpec = ("any",)
    rps_cpus: CpuSpec | None = None
    rps_sock_flow_entries: int | None = Field(default=None, ge=0, le=1 << 29)
    rps_flow_cnt: int | None = Field(default=None, ge=0, le=1 << 29)
    sysctls: dict[str, str] = Field(default_factory=dict)
    sysctls_if_present: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"policy name {v!r} must be lowercase letters, digits and '-' "
                             "(it becomes part of cell ids and folder names)")
        return v

    @field_validator("requires_kernel")
    @classmethod
    def _kernels(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("an empty list allows no kernel; omit the key "
                             "to allow every kernel")
        bad = [k for k in v if k not in KERNEL_NAMES]
        if bad:
            raise ValueError(f"unknown kernel {bad[0]!r} "
                             f"(allowed: {', '.join(KERNEL_NAMES)})")
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


def load_policies(path: Path = DEFAULT_POLICIES_FILE) -> PolicySet:
    """Load and validate a policies file; every problem is reported at its file:line:col."""
    src: Source = load_yaml(path)
    data = plain(src.tree)
    if not isinstance(data, dict):
        raise ConfigError(f"{src.name}:1:1: expected a mapping with a `policies:` key")
    try:
        return PolicySet.model_validate(data)
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


# ---------------------------------------------------------------- CPU list helpers

def fmt_cpulist(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5', the format of smp_affinity_list."""
    xs = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-2,5' -> (0, 1, 2, 5); '' -> ()."""
    out: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out |= set(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return tuple(sorted(out))


def cpu_mask(cpus: Iterable[int]) -> str:
    """CPUs -> the hex mask rps_cpus takes; 32-bit groups joined by ',' like the kernel."""
    value = 0
    for c in cpus:
        value |= 1 << c
    text = f"{value:x}"
    if len(text) <= 8:
        return text
    text = text.zfill((len(text) + 7) // 8 * 8)
    return ",".join(text[i:i + 8] for i in range(0, len(text), 8))


def parse_mask(text: str) -> tuple[int, ...]:
    """'00000000,00000003' or '3' -> (0, 1)."""
    value = int(text.strip().replace(",", "") or "0", 16)
    return tuple(i for i in range(value.bit_length()) if value >> i & 1)


# ---------------------------------------------------------------- guest commands

def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def _queue_dir(iface: str, queue: str) -> str:
    return f"/sys/class/net/{iface}/queues/{queue}"


def apply_commands(resolved: ResolvedPolicy, iface: str, irqs: Sequence[int],
                   rx_queues: Sequence[str], *, gro: bool | None = None) -> list[str]:
    """Guest shell commands that put the receive path into `resolved`'s state.

    Writes every knob, "off" values included, so the result does not depend on
    what ran before. `rx_queues` are the names under /sys/class/net/<iface>/queues
    (e.g. ["rx-0"]); `gro` (the cell's axis) adds an `ethtool -K` when given.
    """
    if not re.match(r"^[A-Za-z0-9_.:-]+$", iface):
        raise NetbedError(f"bad interface name {iface!r}")
    bad = [q for q in rx_queues if not re.match(r"^rx-\d+$", q)]
    if bad:
        raise NetbedError(f"bad rx queue name {bad[0]!r}", hint="pass names like 'rx-0'")
    cmds: list[str] = []
    affinity = fmt_cpulist(resolved.irq_cpus)
    for irq in irqs:
        cmds.append(f"echo {affinity} > /proc/irq/{int(irq)}/smp_affinity_list")
    cmds.append(f"echo {resolved.rps_sock_flow_entries} > "
                f"{_sysctl_path('net.core.rps_sock_flow_entries')}")
    for q in rx_queues:
        cmds.append(f"echo {resolved.rps_mask} > {_queue_dir(iface, q)}/rps_cpus")
        cmds.append(f"echo {resolved.rps_flow_cnt} > {_queue_dir(iface, q)}/rps_flow_cnt")
    for k, v in resolved.sysctls.items():
        cmds.append(f"sysctl -q -w {shlex.quote(f'{k}={v}')}")
    for k, v in resolved.sysctls_if_present.items():
        cmds.append(f"if [ -e {_sysctl_path(k)} ]; then sysctl -q -w {shlex.quote(f'{k}={v}')}; fi")
    if gro is not None:
        cmds.append(f"ethtool -K {iface} gro {'on' if gro else 'off'}")
    return cmds


def apply_script(resolved: ResolvedPolicy, iface: str, irqs: Sequence[int],
                 rx_queues: Sequence[str], *, gro: bool | None = None) -> str:
    """`apply_commands` as one script that stops at the first failing write."""
    return "set -eu\n" + "\n".join(apply_commands(resolved, iface, irqs, rx_queues, gro=gro)) + "\n"


def readback_commands(iface: str, irqs: Sequence[int], sysctl_keys: Iterable[str] = (
        "net.core.rps_sock_flow_entries",)) -> str:
    """One POSIX sh script printing `key=value` lines that `parse_readback` understands.

    Reads every rx queue of `iface` (not only the ones a policy was applied to),
    the IRQs' requested and effective affinity, the given sysctls (`<absent>`
    when the kernel lacks one) and all `ethtool -k` offloads.
    Pass `resolved.sysctl_keys` to read what a policy set.
    """
    if not re.match(r"^[A-Za-z0-9_.:-]+$", iface):
        raise NetbedError(f"bad interface name {iface!r}")
    lines = [f'echo "iface={iface}"']
    for irq in irqs:
        for knob in ("smp_affinity_list", "effective_affinity_list"):
            p = f"/proc/irq/{int(irq)}/{knob}"
            lines.append(f'if [ -r {p} ]; then echo "irq.{int(irq)}.{knob}=$(cat {p})"; '
                         f'else echo "irq.{int(irq)}.{knob}={ABSENT}"; fi')
    lines.append(
        f"for q in /sys/class/net/{iface}/queues/rx-*; do [ -e \"$q\" ] || continue; "
        'n=${q##*/}; for f in rps_cpus rps_flow_cnt; do '
        f'if [ -r "$q/$f" ]; then echo "queue.$n.$f=$(cat "$q/$f")"; '
        f'else echo "queue.$n.$f={ABSENT}"; fi; done; done')
    for k in dict.fromkeys(sysctl_keys):
        if not _SYSCTL_RE.match(k):
            raise NetbedError(f"bad sysctl name {k!r}")
        p = _sysctl_path(k)
        lines.append(f'if [ -e {p} ]; then echo "sysctl.{k}=$(cat {p})"; '
                     f'else echo "sysctl.{k}={ABSENT}"; fi')
    lines.append(
        f"ethtool -k {iface} 2>/dev/null | while IFS=' \t:' read -r k v rest; do "
        'case "$k" in Features*|"") continue;; esac; '
        'echo "offload.$k=$v${rest:+ $rest}"; done')
    return "\n".join(lines) + "\n"


def reader_affinity_command() -> str:
    """Shell script printing `reader.<pid>=<cpulist>`: the allowed CPUs of netserver's data
    process (the newest child of the netserver daemon, as measure's sampler picks it).

    Run it while netperf runs (after warmup): the data process exists only then.
    Its output can be appended to the read-back text; `diff_readback` then checks
    that a pinned reader is pinned where the policy said.
    """
    return ('d=$(pgrep -o -x netserver) && p=$(pgrep -n -x -P "$d" netserver) && '
            'echo "reader.$p=$(sed -n \'s/^Cpus_allowed_list:[[:space:]]*//p\' /proc/$p/status)"'
            ' || echo "reader.none=' + ABSENT + '"\n')


@dataclass(frozen=True)
class Readback:
    """What the guest reported; None / ABSENT mark knobs that could not be read."""

    iface: str | None = None
    irq_affinity: dict[int, tuple[int, ...] | None] = field(default_factory=dict)
    irq_effective: dict[int, tuple[int, ...] | None] = field(default_factory=dict)
    rps_cpus: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    rps_flow_cnt: dict[str, int | None] = field(default_factory=dict)
    sysctls: dict[str, str | None] = field(default_factory=dict)  # None: not on this kernel
    offloads: dict[str, str] = field(default_factory=dict)
    unparsed: tuple[str, ...] = ()
    # netserver data process pid -> allowed CPUs; empty when not read, {-1: None} when
    # reader_affinity_command found no data process
    reader_affinity: dict[int, tuple[int, ...] | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for readback.json."""
        def cl(v: tuple[int, ...] | None) -> str | None:
            return None if v is None else fmt_cpulist(v)
        return {
            "iface": self.iface,
            "irq_affinity": {str(k): cl(v) for k, v in self.irq_affinity.items()},
            "irq_effective": {str(k): cl(v) for k, v in self.irq_effective.items()},
            "rps_cpus": {k: None if v is None else cpu_mask(v) for k, v in self.rps_cpus.items()},
            "rps_flow_cnt": dict(self.rps_flow_cnt),
            "sysctls": dict(self.sysctls),
            "offloads": dict(self.offloads),
            "reader_affinity": {str(k): cl(v) for k, v in self.reader_affinity.items()},
            "unparsed": list(self.unparsed),
        }


def parse_readback(text: str) -> Readback:
    """Parse the output of `readback_commands`; lines it does not know are kept, not dropped."""
    iface: str | None = None
    aff: dict[int, tuple[int, ...] | None] = {}
    eff: dict[int, tuple[int, ...] | None] = {}
    rps: dict[str, tuple[int, ...] | None] = {}
    flow: dict[str, int | None] = {}
    sysctls: dict[str, str | None] = {}
    offloads: dict[str, str] = {}
    reader: dict[int, tuple[int, ...] | None] = {}
    unparsed: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        absent = value == ABSENT
        try:
            if not sep:
                raise ValueError
            if key == "iface":
                iface = value
            elif key.startswith("irq."):
                _, num, knob = key.split(".", 2)
                target = {"smp_affinity_list": aff, "effective_affinity_list": eff}[knob]
                target[int(num)] = None if absent else parse_cpulist(value)
            elif key.startswith("queue."):
                _, queue, knob = key.split(".", 2)
                if knob == "rps_cpus":
                    rps[queue] = None if absent else parse_mask(value)
                elif knob == "rps_flow_cnt":
                    flow[queue] = None if absent else int(value)
                else:
                    raise ValueError
            elif key.startswith("sysctl."):
                sysctls[key.removeprefix("sysctl.")] = None if absent else " ".join(value.split())
            elif key.startswith("offload."):
                offloads[key.removeprefix("offload.")] = value
            elif key.startswith("reader."):
                pid = key.removeprefix("reader.")
                reader[-1 if pid == "none" else int(pid)] = None if absent else parse_cpulist(value)
            else:
                raise ValueError
        except (ValueError, KeyError):
            unparsed.append(raw)
    return Readback(iface, aff, eff, rps, flow, sysctls, offloads, tuple(unparsed), reader)


def diff_readback(resolved: ResolvedPolicy, readback: Readback, *,
                  gro: bool | None = None) -> list[str]:
    """Differences between what `resolved` asked for and what the guest reports.

    Empty when they match. Each entry names the knob, what was wanted and what
    the guest has, so a failed cell says exactly what went wrong.
    """
    out: list[str] = []
    want_aff = fmt_cpulist(resolved.irq_cpus)
    if not readback.irq_affinity:
        out.append("irq affinity: no NIC IRQ was read back (did find_nic_irqs find the NIC?)")
    for irq, got in sorted(readback.irq_affinity.items()):
        if got is None:
            out.append(f"irq {irq} smp_affinity_list: wanted {want_aff}, got <unreadable>")
        elif got != resolved.irq_cpus:
            out.append(f"irq {irq} smp_affinity_list: wanted {want_aff}, got {fmt_cpulist(got)}")
    if not readback.rps_cpus:
        out.append("rps_cpus: no rx queue was read back (wrong interface name?)")
    want_mask = resolved.rps_mask
    for q, got_cpus in sorted(readback.rps_cpus.items()):
        if got_cpus is None or got_cpus != resolved.rps_cpus:
            shown = "<unreadable>" if got_cpus is None else cpu_mask(got_cpus)
            out.append(f"{q} rps_cpus: wanted {want_mask}, got {shown}")
    for q, got_cnt in sorted(readback.rps_flow_cnt.items()):
        if got_cnt != resolved.rps_flow_cnt:
            shown = "<unreadable>" if got_cnt is None else str(got_cnt)
            out.append(f"{q} rps_flow_cnt: wanted {resolved.rps_flow_cnt}, got {shown}")
    wanted = {"net.core.rps_sock_flow_entries": str(resolved.rps_sock_flow_entries),
              **resolved.sysctls}
    for k, v in wanted.items():
        got_v = readback.sysctls.get(k, "<not read back>")
        if got_v is None:
            out.append(f"sysctl {k}: wanted {v}, got {ABSENT} (this kernel does not have it)")
        elif " ".join(str(got_v).split()) != " ".join(v.split()):
            out.append(f"sysctl {k}: wanted {v}, got {got_v}")
    for k, v in resolved.sysctls_if_present.items():
        got_v = readback.sysctls.get(k, "<not read back>")
        if got_v is not None and " ".join(str(got_v).split()) != " ".join(v.split()):
            out.append(f"sysctl {k}: wanted {v}, got {got_v}")
    if resolved.reader_cpu is not None and readback.reader_affinity:
        for pid, cpus in sorted(readback.reader_affinity.items()):
            if pid == -1 or cpus is None:
                out.append(f"reader affinity: wanted {resolved.reader_cpu}, got no netserver "
                           "data process")
            elif cpus != (resolved.reader_cpu,):
                out.append(f"reader affinity (netserver pid {pid}): wanted "
                           f"{resolved.reader_cpu}, got {fmt_cpulist(cpus)}")
    if gro is not None:
        want = "on" if gro else "off"
        got_gro = readback.offloads.get("generic-receive-offload", "<not read back>")
        if got_gro.split(" ")[0] != want:
            out.append(f"generic-receive-offload: wanted {want}, got {got_gro}")
    return out


# ---------------------------------------------------------------- which NIC, which IRQs

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class NicInfo:
    """The data NIC as the guest sees it.

    Interface names are not stable: with the distro kernel an e1000 data NIC
    came up as eth0 and the virtio management NIC as eth1 (module load order),
    so the data NIC is found by its MAC address, never by name.
    """

    iface: str
    device: str   # basename of /sys/class/net/<iface>/device: "virtio2" or "0000:00:03.0"
    driver: str   # "e1000", "virtio_net"

    @property
    def irq_names(self) -> list[str]:
        """Names for `find_nic_irqs`: e1000 names its IRQ after the interface, virtio-net
        after the virtio device (virtio2-input.0, virtio2-output.0, virtio2-config)."""
        return [self.iface, self.device] if self.device.startswith("virtio") else [self.iface]


def nic_info_command(mac: str) -> str:
    """Shell script printing iface=/device=/driver= lines for the NIC with this MAC."""
    mac = mac.lower()
    if not _MAC_RE.match(mac):
        raise NetbedError(f"bad MAC address {mac!r}")
    return ('for d in /sys/class/net/*; do '
            f'[ "$(cat "$d/address" 2>/dev/null)" = "{mac}" ] || continue; '
            'echo "iface=${d##*/}"; '
            'echo "device=$(basename "$(readlink -f "$d/device")")"; '
            'echo "driver=$(basename "$(readlink -f "$d/device/driver")")"; done\n')


def parse_nic_info(text: str, mac: str = "") -> NicInfo:
    """Output of `nic_info_command` -> NicInfo; a NetbedError when the MAC was not found."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            found.setdefault(key, []).append(value.strip())
    ifaces = found.get("iface", [])
    if len(ifaces) != 1:
        what = "no interface" if not ifaces else f"{len(ifaces)} interfaces ({', '.join(ifaces)})"
        raise NetbedError(f"{what} with MAC {mac or '?'} in the guest",
                          hint="check the guest's data NIC (ip -o link) and the MAC qemu gave it")
    return NicInfo(ifaces[0], (found.get("device") or [""])[0], (found.get("driver") or [""])[0])


# ---------------------------------------------------------------- /proc/interrupts

@dataclass(frozen=True)
class IrqLine:
    """One numbered line of /proc/interrupts."""

    irq: int
    counts: tuple[int, ...]
    chip: str
    actions: tuple[str, ...]


_HWIRQ_RE = re.compile(r"^(\d+(-\S+)?|-\S+|Edge|Level|edge|level)$")


def parse_interrupts(text: str) -> list[IrqLine]:
    """Numbered IRQ lines of /proc/interrupts (NMI, LOC, ... are skipped)."""
    lines = text.splitlines()
    if not lines:
        return []
    ncpu = len(re.findall(r"CPU\d+", lines[0]))
    out: list[IrqLine] = []
    for line in lines[1:]:
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().isdigit():
            continue
        tokens = rest.split()
        counts = tokens[:ncpu]
        if len(counts) < ncpu or not all(c.isdigit() for c in counts):
            continue
        tail = tokens[ncpu:]
        chip = tail[0] if tail else ""
        i = 1
        while i < len(tail) - 1 and _HWIRQ_RE.match(tail[i]):
            i += 1
        actions = tuple(a.strip() for a in " ".join(tail[i:]).split(",") if a.strip())
        out.append(IrqLine(int(head), tuple(int(c) for c in counts), chip, actions))
    return out


def _action_matches(action: str, name: str) -> bool:
    return action == name or action.startswith((name + "-", name + "."))


def find_nic_irqs(proc_interrupts: str, names: list[str]) -> list[int]:
    """IRQ numbers with an action named after one of `names`.

    A name matches the action itself or its per-queue variants: "eth1" matches
    "eth1" and "eth1-rx-0" (not "eth10"); "virtio1" matches "virtio1-input.0",
    "virtio1-output.0" and "virtio1-config"; "virtio1-input" only the input queues.
    """
    return sorted({ln.irq for ln in parse_interrupts(proc_interrupts)
                   if any(_action_matches(a, n) for a in ln.actions for n in names)})


def shared_irqs(proc_interrupts: str, irqs: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """Those of `irqs` whose line has more than one action (pinning them moves others too)."""
    wanted = set(irqs)
    return {ln.irq: ln.actions for ln in parse_interrupts(proc_interrupts)
            if ln.irq in wanted and len(ln.actions) > 1}
