"""Property-based fuzzing of experiment and policies loading (issue #15).

Documents are generated as schema-shaped data (valid and invalid values mixed,
so that some are accepted), perturbed by schema-aware mutations (keys dropped or
renamed, values replaced by wrong types), serialised to YAML, then maybe mutated
at the byte level (characters inserted or cut, re-encoded as UTF-16 or
Latin-1), next to free-form YAML-ish text and raw bytes. For every document:

- loading ends in an Experiment or the project's ConfigError, nothing else
  (no traceback: no KeyError, RecursionError, MemoryError, ValueError, ...);
- no hang: each example has a generous deadline, far above the milliseconds
  a load takes (a guard against hangs, not a speed target);
- an accepted experiment round-trips: dumped to YAML and loaded again, it has
  the same model and expands to the same cells;
- an accepted policies file resolves for any cell or says why, and its commands
  are well-formed shell lines.

Seeded (derandomized) and bounded in examples, so the run is repeatable and
takes seconds in the default tier.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from testbed.errors import ConfigError
from testbed.experiment.load import dump_experiment, loads_experiment
from testbed.experiment.matrix import expand
from testbed.experiment.policies import apply_script, load_policies, loads_policies
from testbed.formats.readback import readback_commands

# A hang fails the module instead of stalling the suite (a guard, not a speed target).
pytestmark = pytest.mark.timeout(300)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "configs"
POLICIES = load_policies(FIXTURES / "policies" / "good.yaml")

FUZZ = settings(max_examples=400, derandomize=True, database=None, deadline=10_000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TRICKY = ["on", "off", "yes", "no", "true", "~", "null", "", " ", "1e3", "0x10", "０", "²",
          "TCP_RR:64", "TCP_RR: 64", "TCP_RR:x", "0-4294967295", "2024-01-01", "a b", "x-y",
          "!!binary", "*a", "&a", "..", "../x", "~/p.yaml", "\\0", "9" * 50]
WORDS = ["distro", "stock", "patched", "e1000", "virtio", "virtio-nocsum", "default",
         "pin-same", "pin-cross", "rps", "rfs", "wake-local", "TCP_STREAM", "TCP_MAERTS",
         "TCP_RR", "software", "hardware", "cachemodel", "sequential", "interleaved", "random"]

scalars = st.one_of(
    st.booleans(), st.none(), st.integers(-3, 70), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(TRICKY), st.sampled_from(WORDS))
KEYS = st.one_of(st.text(max_size=8), st.sampled_from(
    ["name", "message_size", "kernel", "nic", "cpus", "policy", "workload", "gro", "rcvbuf",
     "x-a"]))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12)


def axis(values: list[Any]) -> st.SearchStrategy[Any]:
    good = st.lists(st.sampled_from(values), min_size=1, max_size=3, unique_by=repr)
    entries = st.lists(st.one_of(st.dictionaries(KEYS, junk, max_size=2),
                                 st.fixed_dictionaries({"name": junk},
                                                       optional={"message_size": junk})),
                       min_size=1, max_size=2)
    return st.one_of(good, good, st.sampled_from(values), junk, entries)


axes = st.fixed_dictionaries({}, optional={
    "kernel": axis(["distro", "stock", "patched"]),
    "nic": axis(["e1000", "virtio", "virtio-nocsum"]),
    "cpus": axis([1, 2, 3, 4, 8]),
    "policy": axis(["default", "pin-same", "pin-cross", "rps", "rfs", "wake-local"]),
    "workload": axis(["TCP_STREAM", "TCP_RR", "TCP_RR:64", "TCP_MAERTS:1448",
                      {"name": "TCP_RR", "message_size": 8}]),
    "gro": axis(["on", "off", True, False]),
    "rcvbuf": axis(["auto", "64K", "256k", "1M", "1MiB", 65536, "64KB", "8M", "0", 4095,
                    "1024K"]),
})
combination = st.dictionaries(
    st.sampled_from(["kernel", "nic", "cpus", "policy", "workload", "gro", "rcvbuf"]),
    st.sampled_from(["distro", "patched", "e1000", "virtio", 1, 2, 4, "pin-cross", "rps",
                     "wake-local", "TCP_RR", "TCP_STREAM:64", "TCP_MAERTS", "on", "off",
                     "auto", "64K", "1M"]), max_size=3)
experiments = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True), junk),
    "description": st.one_of(st.text(max_size=30), junk),
    "axes": st.one_of(axes, axes, axes, junk),
    "include": st.one_of(st.lists(combination, max_size=3), junk),
    "exclude": st.one_of(st.lists(combination, max_size=3), junk),
    "repetitions": st.one_of(st.integers(-1, 5), junk),
    "duration": st.one_of(st.integers(0, 20), junk),
    "warmup": st.integers(-1, 5),
    "order": st.one_of(st.sampled_from(["sequential", "interleaved", "random"]), junk),
    "seed": st.one_of(st.integers(), junk),
    "counters": st.one_of(st.lists(st.sampled_from(["software", "hardware", "cachemodel"]),
                                   min_size=1, max_size=3), junk),
    "retries": st.integers(-1, 25),
    "memory_mb": st.one_of(st.none(), st.integers(0, 70000)),
    "limits": st.one_of(st.fixed_dictionaries({}, optional={
        "cells": st.integers(0, 50), "runs": st.integers(0, 50),
        "repetitions": st.integers(0, 10)}), junk),
    "x-anchor": junk,
    "junk-key": junk,
})


def plain_axis(values: list[Any]) -> st.SearchStrategy[Any]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=3, unique_by=repr)


# Mostly valid experiments: where the round trip gets exercised.
plausible = st.fixed_dictionaries({}, optional={
    "name": st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True),
    "description": st.text(max_size=30),
    "axes": st.fixed_dictionaries({}, optional={
        "kernel": plain_axis(["distro", "stock", "patched"]),
        "nic": plain_axis(["e1000", "virtio", "virtio-nocsum"]),
        "cpus": plain_axis([1, 2, 3, 4, 8]),
        "policy": plain_axis(["default", "pin-same", "pin-cross", "rps", "rfs"]),
        "workload": plain_axis(["TCP_STREAM", "TCP_RR", "TCP_RR:64", "TCP_MAERTS:1448",
                                {"name": "TCP_RR", "message_size": 8}]),
        "gro": plain_axis(["on", "off", True, False]),
        "rcvbuf": plain_axis(["auto", "64K", "256K", "1M", 131072])}),
    "include": st.lists(combination, max_size=3),
    "exclude": st.lists(combination, max_size=3),
    "repetitions": st.integers(1, 5),
    "order": st.sampled_from(["sequential", "interleaved", "random"]),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "counters": st.lists(st.sampled_from(["software", "hardware", "cachemodel"]),
                         min_size=1, max_size=3, unique=True),
    "memory_mb": st.integers(128, 4096),
    "x-anchor": junk,
})


WRONG_TYPES = st.sampled_from([[], ["x"], [1, 2], {}, {"a": 1}, None, True, False, 1.5, 0,
                               -1, "x", "", "TCP_RR: 1"])


@st.composite
def perturbed(draw: st.DrawFn, value: Any) -> Any:
    """`value` with some keys and values dropped, renamed or replaced, at every depth."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, child in value.items():
            roll = draw(st.integers(0, 19))
            if roll == 0:
                continue  # dropped
            if roll == 1:
                key = draw(KEYS)
            out[key] = draw(st.one_of(WRONG_TYPES, junk)) if roll in (2, 3) \
                else draw(perturbed(child))
        return out
    if isinstance(value, list):
        items = [draw(st.one_of(WRONG_TYPES, junk)) if draw(st.integers(0, 9)) == 0
                 else draw(perturbed(v)) for v in value]
        return items if draw(st.integers(0, 19)) else [*items, draw(junk)]
    return value


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """A plausible experiment, perturbed by schema-aware mutations of keys and values."""
    return draw(perturbed(draw(plausible)))


def to_yaml(data: dict[str, Any], flow: bool) -> str:
    import io

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = flow
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["yaml", "schema", "schema", "bytes-mutated", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        alphabet = st.sampled_from(list("[]{}:,-&*!|>'\"#%@` \n\t?<=~\\") + WORDS + TRICKY)
        return "".join(draw(st.lists(alphabet, max_size=60))).encode()
    data = draw(mutated()) if kind == "schema" else draw(experiments)
    text = to_yaml(data, draw(st.booleans()))
    if kind != "bytes-mutated":
        return text.encode()
    raw = text.encode()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["insert", "delete", "encoding"]))
        at = draw(st.integers(0, len(raw)))
        if op == "insert":
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
        elif op == "delete":
            raw = raw[:at] + raw[at + draw(st.integers(1, 8)):]
        else:
            raw = text.encode(draw(st.sampled_from(["utf-16", "latin-1", "utf-8-sig"])),
                              errors="replace")
    return raw


@FUZZ
@given(documents())
def test_any_document_is_accepted_or_refused_cleanly(data: bytes) -> None:
    try:
        exp = loads_experiment(data, Path("fuzz.yaml"), POLICIES)
    except ConfigError as e:
        assert e.message.startswith("fuzz.yaml"), e.message
        assert len(str(e)) < 3000 and "Traceback" not in str(e)
        return
    again = loads_experiment(dump_experiment(exp), Path("again.yaml"), POLICIES)
    assert again.model_dump() == exp.model_dump()
    assert expand(again) == expand(exp)


@FUZZ
@given(plausible)
def test_plausible_documents_round_trip(data: dict[str, Any]) -> None:
    """Mostly valid documents: the part of the space where many are accepted."""
    try:
        exp = loads_experiment(to_yaml(data, flow=False), Path("fuzz.yaml"), POLICIES)
    except ConfigError:
        return
    again = loads_experiment(dump_experiment(exp), Path("again.yaml"), POLICIES)
    assert again.model_dump() == exp.model_dump()
    assert expand(again) == expand(exp)


# ------------------------------------------------------------------ policies files

CPU_SPECS = st.one_of(st.integers(-2, 9), st.sampled_from(
    ["0", "1", "0-1", "0-3", "3-1", "last", "all", "default", "any", "same-as-irq", "other",
     "0,last", "0-4294967295", "１", "99999999999", [0, "last"], [], True, None, 1.5]))
SYSCTL_VALUES = st.one_of(st.integers(-5, 5), st.sampled_from(
    ["0", "1", "4096", "a b", "5\0", "5\r", "5\n6", "$(reboot)", "'; reboot", True, 1.5, [1]]))
policy_bodies = st.fixed_dictionaries({}, optional={
    "description": st.text(max_size=10),
    "requires_kernel": st.lists(st.sampled_from(["distro", "stock", "patched", "custom"]),
                                max_size=2),
    "min_cpus": st.one_of(st.integers(0, 5), st.sampled_from([True, "2", 2.0])),
    "irq_cpus": CPU_SPECS, "reader_cpu": CPU_SPECS, "rps_cpus": CPU_SPECS,
    "rps_sock_flow_entries": st.sampled_from([0, 4096, 1000, -1, True, "4096", 2**40]),
    "rps_flow_cnt": st.sampled_from([0, 2048, 3, None]),
    "sysctls": st.dictionaries(st.sampled_from(["net.core.busy_read", "a;b", "net core",
                                                "net.core.rx_wake_local"]),
                               SYSCTL_VALUES, max_size=2),
    "sysctls_if_present": st.dictionaries(st.sampled_from(["net.core.rx_wake_local"]),
                                          SYSCTL_VALUES, max_size=1),
})
policy_files = st.fixed_dictionaries({"policies": st.dictionaries(
    st.sampled_from(["p", "pin-x", "Upper", "a b", "q" * 70]), policy_bodies,
    min_size=1, max_size=3)}, optional={"baseline": st.fixed_dictionaries({}, optional={
        "sysctls": st.dictionaries(st.sampled_from(["net.core.busy_read"]), SYSCTL_VALUES,
                                   max_size=1)})})


@FUZZ
@given(st.one_of(policy_files, st.builds(lambda d: d, policy_files).flatmap(perturbed)),
       st.booleans())
def test_any_policies_file_is_accepted_or_refused_cleanly(data: dict[str, Any],
                                                         flow: bool) -> None:
    try:
        policies = loads_policies(to_yaml(data, flow).encode(), Path("p.yaml"))
    except ConfigError as e:
        assert e.message.startswith("p.yaml") and len(str(e)) < 3000, e.message
        return
    for name in policies.names:  # accepted policies resolve or say why, for any cell
        for cpus in (1, 2, 4):
            try:
                resolved = policies.resolve(name, cpus)
            except ConfigError:
                continue
            script = apply_script(resolved, "eth0", [23], ["rx-0"], gro=True)
            assert "\0" not in script and "\r" not in script
            for line in script.splitlines()[1:]:
                assert shlex.split(line)  # every command is one well-formed shell line
            readback_commands("eth0", [23], resolved.sysctl_keys)
