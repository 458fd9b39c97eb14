"""Load an experiment file: read it safely, validate it, cross-check it against its policies.

Validation happens before anything runs, and reports every problem at once,
one line each: `configs/x.yaml:12:5: axes.policy[2]: unknown policy 'rsf' ...`.
Whatever the file holds (bytes that are not UTF-8, a FIFO, an alias bomb, a
number of 5000 digits, a matrix of a million cells), the outcome is an
Experiment or a ConfigError, never a traceback or a hang.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from testbed.errors import ConfigError
from testbed.experiment.config import (
    AXES,
    RCVBUF_AUTO,
    RCVBUF_MAERTS_REASON,
    Experiment,
    gro_word,
)
from testbed.experiment.kernelfile import (
    KernelSet,
    load_kernels,
    resolve_kernels_path,
)
from testbed.experiment.matrix import expand_with_origin, unmatched_excludes
from testbed.experiment.policies import DEFAULT_POLICIES_FILE, PolicySet, load_policies
from testbed.experiment.yamlload import (
    MAX_FILE_BYTES,
    MAX_PROBLEM_LINES,
    STDIN,
    Problem,
    Source,
    cut,
    did_you_mean,
    display_path,
    load_yaml,
    parse_yaml,
    plain,
    raise_problems,
    shown,
    unreadable_reason,
    validation_problems,
)
from testbed.runname import name_from_file

EMPTY_HINT = "see configs/quick.yaml"


def resolve_policies_path(exp_path: Path, value: str | None) -> Path:
    """Where `policies_file:` points: `~` expanded, relative paths relative to the experiment
    (to the working directory for an experiment read from standard input)."""
    if value is None:
        return DEFAULT_POLICIES_FILE
    p = Path(value)
    if value.startswith("~"):
        try:
            return p.expanduser()
        except RuntimeError:  # ~nosuchuser: left as written; it names no file (reported)
            return p
    if p.is_absolute():
        return p
    return p if exp_path == STDIN else exp_path.parent / p


def load_experiment(path: Path, policies: PolicySet | None = None,
                    kernels: KernelSet | None = None) -> Experiment:
    """Load, validate and cross-check an experiment file (`-`: standard input).

    `policies` defaults to the file named by the experiment's `policies_file`
    (relative to the experiment), else configs/policies.yaml; `kernels` likewise from
    `kernels_file`, else configs/kernels.yaml. ConfigError lists every problem.
    """
    path = Path(path)
    return _from_source(load_yaml(path), policies, kernels)


def loads_experiment(data: str | bytes, path: Path,
                     policies: PolicySet | None = None,
                     kernels: KernelSet | None = None) -> Experiment:
    """`load_experiment` for a document already in memory; `path` names it in messages."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{display_path(Path(path))}: larger than {MAX_FILE_BYTES // 1024} KiB")
    return _from_source(parse_yaml(raw, Path(path)), policies, kernels)


def _from_source(src: Source, policies: PolicySet | None,
                 kernels: KernelSet | None = None) -> Experiment:
    if src.empty:
        raise ConfigError(f"{src.name}: empty experiment: nothing to run; {EMPTY_HINT}")
    if not isinstance(src.tree, dict):
        raise ConfigError(f"{src.name}:1:1: expected a mapping of keys (name, axes, ...), got "
                          f"{'a list' if isinstance(src.tree, list) else shown(src.tree)}",
                          hint=EMPTY_HINT)
    # Top-level `x-...` keys are ignored (as in docker compose): a place for YAML
    # anchors that other keys merge in with `<<: *name`. They are dropped before
    # aliases are expanded, so nothing under them can cost time or memory.
    data = plain(src, drop_x_keys=True)
    warnings: list[str] = []
    if "name" not in data:
        data["name"] = name_from_file(src.path)
        if data["name"] != src.path.stem:
            warnings.append(f"{src.name}: no `name:`; the run is named {data['name']!r} after "
                            "the file (add `name:` to choose)")
    kfile = data.get("kernels_file")
    kpath: Path | None = None  # given kernels (a resumed run's copy): no file to resolve
    if kernels is None:
        kpath = resolve_kernels_path(src.path, kfile if isinstance(kfile, str) else None)
        kernels = _load_kernels(src, kpath, explicit=isinstance(kfile, str))
    pfile = data.get("policies_file")
    ppath: Path | None = None  # given policies (a resumed run's copy): no file to resolve
    if policies is None:
        ppath = resolve_policies_path(src.path, pfile if isinstance(pfile, str) else None)
        policies = _load_policies(src, ppath, kernels, explicit=isinstance(pfile, str))
    # Policy and kernel names are checked on the raw data too, so a typo in one is
    # reported together with every other problem, not after they are fixed.
    problems = (_policy_name_problems(src, data, policies)
                + _kernel_name_problems(src, data, kernels))
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise_problems(problems + validation_problems(src, e, Experiment))
        raise  # pragma: no cover
    raise_problems(problems or check_experiment(exp, policies, src, kernels))
    exp._source = src.path
    exp._source_text = src.text
    exp._policies = policies
    exp._policies_path = ppath
    exp._kernels = kernels
    exp._warnings = (*warnings, *_exclude_warnings(exp, src))
    return exp


def _unreadable_named_file(src: Source, key: str, path: Path) -> None:
    """A file an experiment names (`policies_file`, `kernels_file`) that cannot be read:
    the problem points at the key's line."""
    reason = unreadable_reason(path)
    if reason:
        written = str(src.tree.get(key, ""))
        relative = not (written.startswith("~") or Path(written).is_absolute())
        where = " (the path is relative to this experiment file)" \
            if reason == "no such file" and relative else ""
        shown_path = display_path(path)
        if not shown_path.isprintable():
            shown_path = repr(shown_path)
        raise_problems([src.problem((key,), f"{cut(shown_path, 120)}: {reason}{where}")])


def _load_kernels(src: Source, kpath: Path, *, explicit: bool) -> KernelSet:
    """The kernels file; its problems point back at the experiment's `kernels_file:` line."""
    if not explicit:
        return load_kernels(kpath)
    _unreadable_named_file(src, "kernels_file", kpath)
    try:
        return load_kernels(kpath)
    except ConfigError as e:
        named = src.problem(("kernels_file",), "the kernels file named here has the "
                            "problems above")
        raise ConfigError(f"{e.message}\n{named}", hint=e.hint) from None


def _load_policies(src: Source, ppath: Path, kernels: KernelSet, *,
                   explicit: bool) -> PolicySet:
    """The policies file; its problems point back at the experiment's `policies_file:` line."""
    if not explicit:
        return load_policies(ppath, kernels)
    _unreadable_named_file(src, "policies_file", ppath)
    try:
        return load_policies(ppath, kernels)
    except ConfigError as e:
        named = src.problem(("policies_file",), "the policies file named here has the "
                            "problems above")
        raise ConfigError(f"{e.message}\n{named}", hint=e.hint) from None


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
    return [src.problem(loc, f"unknown policy {shown(name)} (allowed: {allowed})"
                        + did_you_mean(name, policies.names))
            # a name that is not text gets its type error from the model instead
            for loc, name in found if isinstance(name, str) and name not in policies]


def _kernel_name_problems(src: Source, data: dict[str, Any],
                          kernels: KernelSet) -> list[Problem]:
    """Kernel names of the axes and include/exclude entries that the kernels file lacks."""
    found: list[tuple[tuple[str | int, ...], Any]] = []
    axes = data.get("axes")
    if isinstance(axes, dict) and "kernel" in axes:
        values = axes["kernel"]
        if isinstance(values, list):
            found += [(("axes", "kernel", i), v) for i, v in enumerate(values)]
        else:
            found.append((("axes", "kernel"), values))
    for section in ("include", "exclude"):
        entries = data.get(section)
        if isinstance(entries, list):
            found += [((section, j, "kernel"), e["kernel"]) for j, e in enumerate(entries)
                      if isinstance(e, dict) and e.get("kernel") is not None]
    allowed = ", ".join(kernels.names)
    return [src.problem(loc, f"unknown kernel {shown(name)} (allowed: {allowed}; variants "
                        f"come from {kernels.path.name})" + did_you_mean(name, kernels.names))
            # a name that is not text gets its type error from the model instead
            for loc, name in found if isinstance(name, str) and name not in kernels]


def _shown_axis_value(axis: str, v: Any) -> str:
    return gro_word(v) if axis == "gro" else str(v)


def _size_problems(exp: Experiment, src: Source) -> list[Problem]:
    """Bounds that keep a dry run fast and a schedule in memory; each says how to raise it."""
    lim = exp.limits
    out: list[Problem] = []
    reps = exp.max_repetitions  # adaptive: the most a cell may get
    if reps > lim.repetitions:
        out.append(src.problem(("repetitions",), f"{reps} is more than the limit of "
                               f"{lim.repetitions}; if you mean it, raise it with "
                               f"`limits: {{repetitions: {reps}}}`"))
    size = exp.axes.size()
    if size > lim.cells:
        out.append(src.problem(("axes",), f"the axes make {size} combinations, more than the "
                               f"limit of {lim.cells} cells; if you mean it, raise it with "
                               f"`limits: {{cells: {size}}}`"))
    return out


def check_experiment(exp: Experiment, policies: PolicySet, src: Source,
                     kernels: KernelSet | None = None) -> list[Problem]:
    """Cross checks pydantic cannot do alone: sizes, duplicates, kernels exist, policies fit
    every cell."""
    problems = _size_problems(exp, src)
    if {"hardware", "cachemodel"} <= set(exp.counters):
        problems.append(src.problem(("counters",), "hardware events need KVM and the cache "
                                    "model needs TCG: one run cannot have both; use "
                                    "`counters: [auto]` or choose one"))
    for axis in AXES:  # duplicates would make two identical cells
        values = getattr(exp.axes, axis)
        seen: set[Any] = set()
        for i, v in enumerate(values):
            if v in seen:
                problems.append(src.problem(("axes", axis, i),
                                            f"{_shown_axis_value(axis, v)} appears twice"))
            seen.add(v)
    problems += _policy_name_problems(src, exp.model_dump(), policies)
    problems += _kernel_name_problems(src, exp.model_dump(), kernels or exp.kernels)
    if problems:
        return problems

    cells = expand_with_origin(exp)
    if not cells:
        return [src.problem(("exclude",), "the matrix is empty: exclude removes every "
                            "combination")]
    plain = exp.plain_repetitions if exp.may_use_cachemodel else 0  # plugin-less ones
    runs = len(cells) * (exp.max_repetitions + plain)
    if runs > exp.limits.runs:
        reps = (f"({exp.max_repetitions} + {plain} plain)" if plain
                else str(exp.max_repetitions))
        return [src.problem(("repetitions",), f"{len(cells)} cells x {reps} "
                            f"repetitions = {runs} runs, more than the limit of "
                            f"{exp.limits.runs}; if you mean it, raise it with "
                            f"`limits: {{runs: {runs}}}`")]
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
        if cell.rcvbuf != RCVBUF_AUTO and cell.workload.name == "TCP_MAERTS":
            loc_r: tuple[str | int, ...] = (
                ("axes", "rcvbuf", exp.axes.rcvbuf.index(cell.rcvbuf)) if origin is None
                else ("include", origin))
            fix_r = (f"add `{{workload: TCP_MAERTS, rcvbuf: {cell.rcvbuf}}}` to exclude"
                     if origin is None else "change or remove this include entry")
            key = (f"r:{cell.rcvbuf}", loc_r)
            groups.setdefault(key, []).append(cell.cell_id)
            messages[key] = (f"rcvbuf {cell.rcvbuf} cannot apply to TCP_MAERTS "
                             f"({RCVBUF_MAERTS_REASON}); {fix_r}")
    for key, ids in groups.items():
        example = f" ({len(ids)} cell{'s' if len(ids) > 1 else ''}, e.g. {ids[0]})"
        problems.append(src.problem(key[1], messages[key] + example))
    return problems


def _exclude_warnings(exp: Experiment, src: Source) -> list[str]:
    out = []
    unused = unmatched_excludes(exp)
    for j in unused[:MAX_PROBLEM_LINES]:
        p = src.problem(("exclude", j), "matches no combination of the axes (a typo?)")
        out.append(f"{p.file}:{p.line}:{p.col}: warning: {p.path}: {p.message}")
    if len(unused) > MAX_PROBLEM_LINES:
        out.append(f"{src.name}: warning: ... and {len(unused) - MAX_PROBLEM_LINES} more "
                   "exclude entries that match nothing")
    return out


def experiment_from_dict(data: dict[str, Any], policies: PolicySet,
                         source: Path | None = None,
                         kernels: KernelSet | None = None) -> Experiment:
    """Build and check an experiment from plain data (tests, generated matrices)."""
    src = Source(source or Path("<dict>"), CommentedMap())
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise_problems(validation_problems(src, e, Experiment))
        raise  # pragma: no cover
    if kernels is not None:
        exp._kernels = kernels
    raise_problems(check_experiment(exp, policies, src, kernels))
    exp._source = source
    exp._policies = policies
    return exp


def dump_experiment(exp: Experiment) -> str:
    """The validated experiment as YAML that loads back to the same cells.

    Every value is written out (defaults included), workloads as mappings and
    GRO as true/false; `name` and `policies_file` as validated.
    """
    data = exp.model_dump(mode="json", exclude_none=True)
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()
