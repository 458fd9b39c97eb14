"""testbed.vm.hostfacts: choosing the accelerator, and the probe guest's command line."""

from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.vm.cachemodel import micro_argv
from testbed.vm.hostfacts import KvmVerdict, choose_accel, probe_argv


def test_auto_falls_back_to_tcg_and_says_why():
    accel, why = choose_accel("auto", KvmVerdict(False, "a stock kernel did not boot"))
    assert accel == "tcg" and why == "TCG, because a stock kernel did not boot"


def test_auto_takes_kvm_when_probe_booted():
    assert choose_accel("auto", KvmVerdict(True, "booted in 1.0 s", 1.0))[0] == "kvm"


def test_kvm_requested_but_unusable_is_an_error_with_a_fix():
    with pytest.raises(NetbedError, match="use --accel tcg"):
        choose_accel("kvm", KvmVerdict(False, "hangs"))


def test_probe_and_micro_guests_share_the_experiment_guests_argv_builder():
    probe = probe_argv("qemu", Path("/k"), Path("/i"), "kvm", Path("/c.log"))
    micro = micro_argv("qemu", Path("/k"), Path("/i"), 2, "single")
    for argv in (probe, micro):
        assert argv[argv.index("-machine") + 1] == "q35"
        assert "-nodefaults" in argv and "-no-user-config" in argv and "-no-reboot" in argv
    assert probe[probe.index("-accel") + 1] == "kvm" and probe[probe.index("-smp") + 1] == "1"
    assert "file,id=console,path=/c.log" in probe
    assert micro[micro.index("-serial") + 1] == "stdio"
    assert micro[micro.index("-accel") + 1] == "tcg,thread=single"
