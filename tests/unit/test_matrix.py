"""Matrix expansion, include/exclude, run order, sharding, estimate and dry-run table."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.errors import NetbedError
from testbed.experiment.config import Cell, Experiment
from testbed.experiment.load import experiment_from_dict, load_experiment
from testbed.experiment.matrix import (
    cells_table,
    count_boots,
    estimate_seconds,
    expand,
    format_duration,
    parse_shard,
    schedule,
    shard,
    unmatched_excludes,
)
from testbed.experiment.policies import load_policies
from testbed.vocabulary import AXES

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "configs"
REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def policies():
    return load_policies(FIXTURES / "policies" / "good.yaml")


def _exp(policies, **data):
    return experiment_from_dict({"name": "t", **data}, policies)


def test_product_order_last_axis_fastest(policies) -> None:
    exp = _exp(policies, axes={"nic": ["e1000", "virtio"], "policy": ["default", "pin-same"],
                               "gro": ["on", "off"]})
    ids = [c.cell_id for c in expand(exp)]
    assert ids == [
        "distro-e1000-c2-default-TCP_STREAM-16384-gro_on",
        "distro-e1000-c2-default-TCP_STREAM-16384-gro_off",
        "distro-e1000-c2-pin-same-TCP_STREAM-16384-gro_on",
        "distro-e1000-c2-pin-same-TCP_STREAM-16384-gro_off",
        "distro-virtio-c2-default-TCP_STREAM-16384-gro_on",
        "distro-virtio-c2-default-TCP_STREAM-16384-gro_off",
        "distro-virtio-c2-pin-same-TCP_STREAM-16384-gro_on",
        "distro-virtio-c2-pin-same-TCP_STREAM-16384-gro_off",
    ]


def test_include_exclude_semantics(policies) -> None:
    exp = load_experiment(FIXTURES / "good" / "include-exclude.yaml", policies)
    ids = [c.cell_id for c in expand(exp)]
    assert ids == [
        "distro-e1000-c2-default-TCP_STREAM-16384-gro_on",
        "distro-e1000-c2-default-TCP_RR-1-gro_on",
        "distro-e1000-c2-default-TCP_RR-64-gro_on",
        "distro-virtio-c2-default-TCP_STREAM-16384-gro_on",
        "distro-virtio-c2-default-TCP_RR-1-gro_on",
        "distro-virtio-c2-default-TCP_RR-64-gro_on",
        "distro-virtio-c2-pin-same-TCP_STREAM-16384-gro_on",
        "distro-virtio-c2-pin-same-TCP_RR-1-gro_on",
        "distro-virtio-c2-pin-same-TCP_RR-64-gro_on",
        "patched-e1000-c2-default-TCP_STREAM-16384-gro_on",
        "patched-virtio-c2-default-TCP_STREAM-16384-gro_on",
        "patched-virtio-c2-pin-same-TCP_STREAM-16384-gro_on",
        # include[0]: new cell; unnamed axes (cpus, workload, gro) take their first value
        "patched-e1000-c2-wake-local-TCP_STREAM-16384-gro_on",
        # include[2]: an excluded combination added back (include runs after exclude)
        "patched-virtio-c2-default-TCP_RR-64-gro_on",
    ]


def test_exclude_with_sized_workload_matches_only_that_size(policies) -> None:
    exp = _exp(policies, axes={"workload": ["TCP_RR:1", "TCP_RR:64"]},
               exclude=[{"workload": "TCP_RR:64"}])
    assert [c.workload.id for c in expand(exp)] == ["TCP_RR-1"]


def test_include_without_size_uses_the_default_size(policies) -> None:
    exp = _exp(policies, axes={"workload": ["TCP_STREAM"]}, include=[{"workload": "TCP_RR"}])
    assert [c.workload.id for c in expand(exp)] == ["TCP_STREAM-16384", "TCP_RR-1"]


def test_no_duplicates_and_stable(policies) -> None:
    exp = load_experiment(REPO / "configs" / "full.yaml", policies)
    a, b = expand(exp), expand(exp)
    assert a == b
    assert len({c.cell_id for c in a}) == len(a) == len(set(a))


# ------------------------------------------------------------------ order


def _cells_and(policies, order: str, reps: int = 3, seed: int = 0):
    exp = _exp(policies, axes={"nic": ["e1000", "virtio"], "policy": ["default", "pin-same"]},
               repetitions=reps, order=order, seed=seed)
    return exp, expand(exp)


def test_sequential(policies) -> None:
    exp, cells = _cells_and(policies, "sequential", reps=2)
    sched = schedule(exp, cells)
    assert sched == [(cells[0], 0), (cells[0], 1), (cells[1], 0), (cells[1], 1),
                     (cells[2], 0), (cells[2], 1), (cells[3], 0), (cells[3], 1)]


def test_interleaved(policies) -> None:
    exp, cells = _cells_and(policies, "interleaved", reps=2)
    assert schedule(exp, cells) == [(c, 0) for c in cells] + [(c, 1) for c in cells]


def test_random_is_seeded_round_by_round(policies) -> None:
    exp, cells = _cells_and(policies, "random", reps=4, seed=3)
    sched = schedule(exp, cells)
    assert sched == schedule(exp, cells)  # deterministic
    assert Counter(sched) == Counter((c, r) for c in cells for r in range(4))  # each run once
    for r in range(4):  # rounds: every cell's repetition r before any repetition r+1
        rnd = sched[r * len(cells):(r + 1) * len(cells)]
        assert {rep for _, rep in rnd} == {r} and {c for c, _ in rnd} == set(cells)
    orders = {tuple(c.cell_id for c, _ in sched[r * 4:(r + 1) * 4]) for r in range(4)}
    assert len(orders) > 1  # rounds are shuffled independently
    other, _ = _cells_and(policies, "random", reps=4, seed=4)
    assert schedule(other, cells) != sched


def test_random_order_is_pinned_for_seed_0(policies) -> None:
    """Shuffling uses only random.random(), which Python keeps stable across versions."""
    exp, cells = _cells_and(policies, "random", reps=1, seed=0)
    got = [cells.index(c) for c, _ in schedule(exp, cells)]
    assert sorted(got) == [0, 1, 2, 3]
    # Random(0).random() -> 0.844, 0.758, 0.421: Fisher-Yates swaps (3,3), (2,2), (1,0)
    assert got == [1, 0, 2, 3]


# ------------------------------------------------------------------ sharding


def test_shards_partition_and_balance(policies) -> None:
    exp = load_experiment(REPO / "configs" / "full.yaml", policies)
    cells = expand(exp)
    for n in (1, 2, 3, 7):
        parts = [shard(cells, k, n) for k in range(1, n + 1)]
        ids = [c.cell_id for p in parts for c in p]
        assert sorted(ids) == sorted(c.cell_id for c in cells)  # partition: each once
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        for p in parts:  # input order kept inside a shard
            mine = set(p)
            assert p == [c for c in cells if c in mine]


def test_shard_is_deterministic_and_input_order_free(policies) -> None:
    exp = load_experiment(REPO / "configs" / "quick.yaml", policies)
    cells = expand(exp)
    first = [c.cell_id for c in shard(cells, 2, 3)]
    assert first == [c.cell_id for c in shard(list(cells), 2, 3)]
    assert sorted(first) == sorted(c.cell_id for c in shard(list(reversed(cells)), 2, 3))


def test_parse_shard() -> None:
    assert parse_shard("2/4") == (2, 4)
    assert parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ("0/4", "5/4", "2", "a/b", "1/0", ""):
        with pytest.raises(NetbedError, match="bad --shard"):
            parse_shard(bad)


def test_shard_rejects_bad_k(policies) -> None:
    with pytest.raises(NetbedError, match="between 1 and N"):
        shard([], 0, 2)


# ------------------------------------------------------------------ estimate and table


def test_count_boots_by_reuse(policies) -> None:
    exp, cells = _cells_and(policies, "sequential", reps=2)
    sched = schedule(exp, cells)
    assert count_boots(sched, "none") == 8
    assert count_boots(sched, "cell") == 4
    assert count_boots(sched, "guest") == 2  # the two policies share a boot per NIC
    exp_i, _ = _cells_and(policies, "interleaved", reps=2)
    assert count_boots(schedule(exp_i, cells), "cell") == 8


def test_estimate_arithmetic(policies) -> None:
    exp = _exp(policies, axes={"nic": ["e1000", "virtio"]}, repetitions=3, duration=10,
               warmup=2, order="sequential")
    cells = expand(exp)
    # 2 boots x 20 s + 6 reps x (2 + 10 + 5) s
    assert estimate_seconds(exp, cells, 20.0, rep_overhead_seconds=5.0, plain=0) == 40 + 6 * 17
    # counters auto may mean the cache model: one plain repetition per cell, each NIC
    # booted once more without the plugin: 4 boots, 8 repetitions
    assert exp.counters == ["auto"] and exp.plain_repetitions == 1
    assert estimate_seconds(exp, cells, 20.0, rep_overhead_seconds=5.0,
                            model_extra_seconds=0.0) == 80 + 8 * 17
    # and the 6 instrumented ones take longer under the model
    assert estimate_seconds(exp, cells, 20.0, rep_overhead_seconds=5.0,
                            model_extra_seconds=4.0) == 80 + 8 * 17 + 6 * 4
    software = _exp(policies, axes={"nic": ["e1000", "virtio"]}, repetitions=3, duration=10,
                    warmup=2, order="sequential", counters=["software"])
    assert estimate_seconds(software, cells, 20.0, rep_overhead_seconds=5.0) == 40 + 6 * 17


def test_plain_repetitions_come_last_numbered_after_the_instrumented_ones(policies) -> None:
    for order in ("sequential", "interleaved", "random"):
        exp = _exp(policies, axes={"nic": ["e1000", "virtio"], "policy": ["default", "rfs"]},
                   repetitions=2, order=order, plain_repetitions=2)
        cells = expand(exp)
        sched = schedule(exp, cells, plain=2)
        assert len(sched) == 4 * 4
        main, plain = sched[:8], sched[8:]
        assert {r for _, r in main} == {0, 1} and {r for _, r in plain} == {2, 3}
        assert sorted((c.cell_id, r) for c, r in plain) == sorted(
            (c.cell_id, r) for c in cells for r in (2, 3))
        assert schedule(exp, cells) == main  # without plain: as before
        if order == "interleaved":  # rounds: every cell's plain rep 2 before any rep 3
            assert [r for _, r in plain] == [2, 2, 2, 2, 3, 3, 3, 3]
        # each kind boots its own guests, once per NIC run of cells
        assert count_boots(sched, "guest", plain_from=2) == \
            count_boots(main, "guest") + count_boots(plain, "guest")
    adaptive = _exp(policies, repetitions={"min": 5, "max": 7})
    assert [r for _, r in schedule(adaptive, expand(adaptive), plain=1)][-1] == 7


def test_quick_fits_in_15_minutes_by_estimate() -> None:
    exp = load_experiment(REPO / "configs" / "quick.yaml")
    cells = expand(exp)
    seconds = estimate_seconds(exp, cells)
    print(f"quick.yaml estimate: {format_duration(seconds)} ({len(cells)} cells)")
    assert seconds <= 15 * 60


def test_format_duration() -> None:
    assert format_duration(59.6) == "1 min 0 s"
    assert format_duration(75) == "1 min 15 s"
    assert format_duration(3725) == "1 h 2 min"
    assert format_duration(5) == "5 s"


def test_cells_table_is_plain_text(policies) -> None:
    exp, cells = _cells_and(policies, "random", reps=2, seed=9)
    table = cells_table(exp, cells)
    lines = table.splitlines()
    assert lines[0].split() == ["#", "kernel", "nic", "cpus", "policy", "workload", "gro",
                                "rcvbuf", "cell", "id"]
    assert lines[2].split()[:8] == ["1", "distro", "e1000", "2", "default",
                                    "TCP_STREAM-16384", "on", "auto"]
    assert "\x1b" not in table
    assert lines[-1].startswith("t: 4 cells x 2 repetitions + 1 plain (no plugin) = 12 runs, "
                                "order random (seed 9)")
    assert lines[-2].startswith("plain: 1 repetition(s) per cell booted without")
    software = _exp(policies, axes={"nic": ["e1000", "virtio"], "policy": ["default", "rfs"]},
                    repetitions=2, counters=["software"])
    assert cells_table(software, expand(software)).splitlines()[-1].startswith(
        "t: 4 cells x 2 repetitions = 8 runs")


# ------------------------------------------------------------------ expansion = the definition


def _reference_expand(exp: Experiment) -> list[Cell]:
    """The include/exclude semantics written the plain way (Combination.matches per cell)."""
    ax = exp.axes
    out: list[Cell] = []
    for kernel, nic, cpus, policy, workload, gro, rcvbuf in itertools.product(
            ax.kernel, ax.nic, ax.cpus, ax.policy, ax.workload, ax.gro, ax.rcvbuf):
        cell = Cell(kernel=kernel, nic=nic, cpus=cpus, policy=policy, workload=workload, gro=gro,
                    rcvbuf=rcvbuf)
        if cell not in out and not any(ex.matches(cell) for ex in exp.exclude):
            out.append(cell)
    for inc in exp.include:
        if any(inc.matches(cell) for cell in out):
            continue
        values = {axis: getattr(exp.axes, axis)[0] for axis in AXES}
        for axis in inc.given_axes():
            value = getattr(inc, axis)
            values[axis] = value.to_workload() if axis == "workload" else value
        cell = Cell(**values)
        if cell not in out:
            out.append(cell)
    return out


_ENTRY = st.fixed_dictionaries({}, optional={
    "kernel": st.sampled_from(["distro", "stock"]), "nic": st.sampled_from(["e1000", "virtio"]),
    "cpus": st.sampled_from([1, 2, 4]), "policy": st.sampled_from(["default", "pin-same"]),
    "workload": st.sampled_from(["TCP_RR", "TCP_RR:64", "TCP_STREAM:1448", "TCP_STREAM"]),
    "gro": st.booleans(), "rcvbuf": st.sampled_from(["auto", "64K", "1M"])}).filter(bool)


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(st.fixed_dictionaries({
    "axes": st.fixed_dictionaries({}, optional={
        "kernel": st.lists(st.sampled_from(["distro", "stock"]), min_size=1, unique=True),
        "nic": st.lists(st.sampled_from(["e1000", "virtio"]), min_size=1, unique=True),
        "cpus": st.lists(st.sampled_from([1, 2, 4]), min_size=1, unique=True),
        "policy": st.lists(st.sampled_from(["default", "pin-same"]), min_size=1, unique=True),
        "workload": st.lists(st.sampled_from(["TCP_RR", "TCP_RR:64", "TCP_STREAM:1448"]),
                             min_size=1, unique=True),
        "gro": st.lists(st.booleans(), min_size=1, unique=True),
        "rcvbuf": st.lists(st.sampled_from(["auto", "64K", "1M"]), min_size=1, unique=True)}),
    "include": st.lists(_ENTRY, max_size=4),
    "exclude": st.lists(_ENTRY, max_size=4)}))
def test_expand_matches_the_plain_definition(data: dict[str, object]) -> None:
    exp = Experiment.model_validate({"name": "t", **data})
    assert expand(exp) == _reference_expand(exp)
    ax = exp.axes
    combos = [Cell(kernel=k, nic=n, cpus=c, policy=p, workload=w, gro=g, rcvbuf=r)
              for k, n, c, p, w, g, r in itertools.product(ax.kernel, ax.nic, ax.cpus,
                                                            ax.policy, ax.workload, ax.gro,
                                                            ax.rcvbuf)]
    assert unmatched_excludes(exp) == [j for j, ex in enumerate(exp.exclude)
                                       if not any(ex.matches(c) for c in combos)]


def test_shipped_configs_expand_as_defined() -> None:
    for name in ("quick.yaml", "full.yaml"):
        exp = load_experiment(REPO / "configs" / name)
        assert expand(exp) == _reference_expand(exp)


def test_shard_count_is_bounded() -> None:
    assert parse_shard("9999/9999") == (9999, 9999)
    with pytest.raises(NetbedError, match="at most 9999 shards"):
        parse_shard("1/10000")
    with pytest.raises(NetbedError, match="expected K/N"):
        parse_shard("1/" + "9" * 5000)
