"""tasks.py as a command line: -h is help everywhere, every flag has a name and help."""

from __future__ import annotations

import copy

import pytest
from invoke.parser import Argument

import tasks

TASKS = sorted(tasks.ns.task_names)


def arguments(name: str) -> list[Argument]:
    """A task's arguments as invoke builds them (on a copy: building consumes `help`)."""
    return copy.deepcopy(tasks.ns[name]).get_arguments()


def flags(name: str) -> list[tuple[str, list[str], bool]]:
    """(name, its flag spellings, positional) of a task's arguments."""
    return [(a.name, list(a.names), a.positional) for a in arguments(name)]


def test_run_hosts_holds_the_multi_host_options_and_run_matrix_stays_small():
    assert "run-hosts" in TASKS
    matrix = {n for n, _, _ in flags("run-matrix")}
    assert not any(n.startswith("hosts") for n in matrix) and len(matrix) <= 8


@pytest.mark.parametrize("name", TASKS)
def test_h_is_left_to_help_and_no_flag_is_nameless(name):
    for arg, names, positional in flags(name):
        assert "h" not in names, f"{name}: -h would be --{arg}, not help"
        assert all(n.strip("-") for n in names), f"{name}: a flag renders as --= ({arg})"
        # invoke gives a positional argument the next word, even -h or --help
        assert not positional, f"{name}: {arg} is positional and would swallow --help"


@pytest.mark.parametrize("name", TASKS)
def test_every_flag_says_what_it_does(name):
    for arg in arguments(name):
        assert arg.help, f"invoke {name}: --{arg.name} has no help"


def test_shell_says_when_its_data_plane_is_not_the_experiments():
    note = "socket: no CAP_NET_ADMIN; socket netdev: no vnet header, so no NIC has " \
           "checksum offload"
    line = tasks.dataplane_line(note)
    assert "NOT what experiments measure" in line and "run as root" in line
    tap = tasks.dataplane_line("tap: root with /dev/net/tun; tap with vnet_hdr: virtio "
                               "keeps checksum offload")
    assert tap.endswith("(as in experiments)")
