"""testbed.run.remote's pure parts: --hosts parsing, shard assignment, remote commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.experiment.load import load_experiment
from testbed.experiment.matrix import expand, parse_shard, shard
from testbed.run.remote import (
    Assignment,
    HostOutcome,
    HostSpec,
    LinePrefixer,
    RemoteOptions,
    RemotePlan,
    assign_shards,
    config_files,
    parse_hosts,
)
from testbed.settings import CONFIGS_DIR


@pytest.mark.parametrize(("text", "expected"), [
    ("h1", [HostSpec("h1")]),
    ("alice@h1", [HostSpec("h1", "alice")]),
    ("alice@h1:2222", [HostSpec("h1", "alice", 2222)]),
    ("a@h1, b@h2:22 ,h3", [HostSpec("h1", "a"), HostSpec("h2", "b", 22), HostSpec("h3")]),
    ("root@[::1]:2200", [HostSpec("::1", "root", 2200)]),
    ("[fe80::1]", [HostSpec("fe80::1")]),
    ("u@10.0.0.7", [HostSpec("10.0.0.7", "u")]),
    ("u@127.0.0.1:22,u@127.0.0.1:22", [HostSpec("127.0.0.1", "u", 22)] * 2),
])
def test_parse_hosts(text, expected):
    assert parse_hosts(text) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "empty"),
    ("h1,,h2", "entry 2 ''"),
    ("a@b@c", "entry 1 'a@b@c'"),
    ("h1:port", "not [user@]host[:port]"),
    ("h1:0", "out of range"),
    ("h1:70000", "out of range"),
    ("::1", "not [user@]host[:port]"),  # bare IPv6 is ambiguous with a port
    ("user@host name", "not [user@]host[:port]"),
])
def test_parse_hosts_rejects_bad_entries_with_a_fix(text, fragment):
    with pytest.raises(NetbedError) as info:
        parse_hosts(text)
    assert fragment in str(info.value)
    assert info.value.hint


def test_hostspec_round_trips_through_its_string():
    for text in ("h", "u@h", "u@h:2", "u@[::1]:2", "[::1]"):
        (spec,) = parse_hosts(text)
        assert str(spec) == text
        assert parse_hosts(str(spec)) == [spec]


def test_assignment_gives_host_i_shard_i_of_n_and_unique_labels():
    hosts = parse_hosts("u@127.0.0.1:2222,u@127.0.0.1:2222,v@[::1]")
    assigned = assign_shards(hosts)
    assert [a.shard for a in assigned] == ["1/3", "2/3", "3/3"]
    assert [a.host for a in assigned] == hosts
    labels = [a.label for a in assigned]
    assert labels == ["1-127.0.0.1-2222", "2-127.0.0.1-2222", "3-__1"]
    assert all(parse_shard(a.shard) == (a.index, a.total) for a in assigned)


def test_assigned_shards_partition_the_full_study():
    cells = expand(load_experiment(CONFIGS_DIR / "full.yaml"))
    assigned = assign_shards(parse_hosts("a,b,c,d,e"))
    parts = [shard(cells, *parse_shard(a.shard)) for a in assigned]
    ids = [c.cell_id for part in parts for c in part]
    assert sorted(ids) == sorted(c.cell_id for c in cells)
    assert len(ids) == len(set(ids))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _plan(**opts) -> RemotePlan:
    return RemotePlan("/home/u/netbed-runs/T/1-h", "1/2", "tiny.yaml", RemoteOptions(**opts),
                      commit="abc123")


def test_default_plan_ships_installs_and_runs_the_shard_with_its_own_results_dir():
    plan = _plan()
    assert plan.src == "/home/u/netbed-runs/T/1-h/src"
    assert plan.python == "/home/u/netbed-runs/T/1-h/venv/bin/python"
    unpack = plan.unpack_command()
    assert "git clone -q /home/u/netbed-runs/T/1-h/netbed.bundle /home/u/netbed-runs/T/1-h/src" \
        in unpack
    assert unpack.endswith("checkout -q abc123")
    install = plan.install_command()
    assert install is not None and "--system-site-packages" in install
    assert install.endswith("-e /home/u/netbed-runs/T/1-h/src")
    run = shlex.split(plan.run_command().split("&& exec ", 1)[1])
    assert run[:2] == ["env", "INVOKE_NETBED_RESULTS_DIR=/home/u/netbed-runs/T/1-h/results"]
    assert run[-8:] == ["-m", "invoke", "run-matrix", "--config",
                        "/home/u/netbed-runs/T/1-h/config/tiny.yaml", "--shard", "1/2",
                        "--no-report"]
    assert "INVOKE_NETBED_CACHE_DIR" not in plan.run_command()


def test_plan_with_netbed_already_on_the_host_ships_and_installs_nothing():
    plan = _plan(netbed_path="/opt/netbed", python="/opt/venv/bin/python")
    assert plan.src == "/opt/netbed"
    assert plan.install_command() is None
    assert plan.python == "/opt/venv/bin/python"
    assert plan.run_command().startswith("cd /opt/netbed && ")


def test_plan_no_install_uses_the_hosts_python_and_cache_dir_is_passed():
    plan = _plan(install=False, python="python3.11", cache_dir="/srv/netbed cache")
    assert plan.install_command() is None
    assert plan.python == "python3.11"
    assert "INVOKE_NETBED_CACHE_DIR='/srv/netbed cache'" in plan.run_command()


def test_paths_with_spaces_are_quoted_everywhere():
    plan = RemotePlan("/tmp/a b/1-h", "2/2", "my exp.yaml", RemoteOptions(), commit=None)
    for cmd in (plan.unpack_command(), plan.install_command() or "", plan.run_command(),
                plan.pack_command(), plan.interrupt_command()):
        assert "'/tmp/a b/" in cmd
    assert plan.unpack_command().endswith("checkout -q HEAD")


def test_pack_excludes_scratch_space_and_interrupt_targets_the_recorded_pid():
    plan = _plan()
    assert "--exclude='./*/.work'" in plan.pack_command()
    assert "echo $$ > /home/u/netbed-runs/T/1-h/run.pid" in plan.run_command()
    assert 'kill -INT "$(cat /home/u/netbed-runs/T/1-h/run.pid)"' in plan.interrupt_command()


def test_connect_kwargs_use_an_explicit_key_alone():
    assert RemoteOptions().connect_kwargs() == {}
    kw = RemoteOptions(key_filename="~/k").connect_kwargs()
    assert kw["look_for_keys"] is False
    assert kw["key_filename"] == str(Path("~/k").expanduser())


def test_line_prefixer_emits_whole_lines_only():
    got: list[str] = []
    w = LinePrefixer("1-h", got.append)
    w.write("netbed: run X")
    assert got == []
    w.write(": 2 cells\r\n[1/2] cell a ...\n\npartial")
    assert got == ["[1-h] netbed: run X: 2 cells", "[1-h] [1/2] cell a ..."]
    w.flush()
    assert got[-1] == "[1-h] partial"
    w.flush()
    assert len(got) == 3


def test_outcome_is_ok_only_with_exit_zero_and_a_run_folder(tmp_path):
    a = Assignment(HostSpec("h"), 1, 2)
    assert not HostOutcome(a).ok
    assert not HostOutcome(a, exit_code=0).ok
    assert HostOutcome(a, exit_code=0, run_dirs=[tmp_path]).ok
    failed = HostOutcome(a, exit_code=1, run_dirs=[tmp_path])
    assert not failed.ok and "exited 1" in failed.describe()
    broken = HostOutcome(a, error="NoValidConnectionsError: refused")
    assert "FAILED: NoValidConnectionsError" in broken.describe()


def test_config_files_validates_locally_and_lists_the_policies_file(tmp_path):
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "p.yaml").write_text((CONFIGS_DIR / "policies.yaml").read_text())
    exp = (CONFIGS_DIR / "quick.yaml").read_text()
    (tmp_path / "e.yaml").write_text(exp + "policies_file: pol/p.yaml\n")
    cfg = config_files(tmp_path / "e.yaml")
    assert cfg.name == "e.yaml"
    assert [rel for _, rel in cfg.files] == ["e.yaml", "pol/p.yaml"]
    (tmp_path / "bad.yaml").write_text(re.sub(r"^repetitions: \d+", "repetitions: two", exp,
                                                flags=re.M))
    with pytest.raises(NetbedError):
        config_files(tmp_path / "bad.yaml")


def test_config_files_ship_the_kernels_file_and_its_own_patches(tmp_path):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "mine.patch").write_text("--- a/x\n+++ b/x\n")
    (tmp_path / "k" / "kernels.yaml").write_text(
        "variants:\n  mine: {patches: [0001-net-optionally-wake-socket-readers-on-the-CPU-"
        "that-r.patch, mine.patch]}\n")
    (tmp_path / "e.yaml").write_text("kernels_file: k/kernels.yaml\naxes: {kernel: [mine]}\n")
    cfg = config_files(tmp_path / "e.yaml")
    # the wake-local patch is in images/patches/: it travels with the shipped commit
    assert [rel for _, rel in cfg.files] == ["e.yaml", "k/kernels.yaml", "k/mine.patch"]
    (tmp_path / "linux.tar.xz").write_bytes(b"")
    (tmp_path / "k" / "kernels.yaml").write_text("variants:\n  mine: {base: ../linux.tar.xz}\n")
    with pytest.raises(NetbedError, match=r"a local base .* is not shipped"):
        config_files(tmp_path / "e.yaml")
