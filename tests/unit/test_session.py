"""testbed.run.session: the fault-injection hook of the real collaborators."""

from __future__ import annotations

import pytest

from testbed.errors import NetbedError
from testbed.run.session import Fault


@pytest.mark.parametrize("text", ["crash:x", "hang:", "hang", "x"])
def test_bad_fault_specs_are_rejected(text):
    with pytest.raises(NetbedError, match="hang:<cell-id>"):
        Fault.parse(text)


def test_fault_spec_parses():
    assert Fault.parse("hang:cell-a") == Fault("cell-a", "hang")
    assert Fault.parse(None) is None


def test_the_counter_plan_decides_plugin_and_accelerator(tmp_path):
    from pathlib import Path

    from testbed.experiment.load import loads_experiment
    from testbed.run.folder import RunDir
    from testbed.run.provenance import Provenance
    from testbed.run.session import ExperimentGuests
    from testbed.settings import Settings
    from tests.unit.test_provenance import facts

    exp = loads_experiment("name: s\ncounters: [cachemodel]\n", Path("s.yaml"))
    prov = Provenance(RunDir(tmp_path), exp.counters, log=lambda m: None)
    guests = ExperimentGuests(Settings(), RunDir(tmp_path), exp, prov, log=lambda m: None)
    prov.decide(facts(accel="kvm", pmu=True))
    assert guests.cachemodel and guests.accel == "tcg"  # the plugin needs TCG
    auto = loads_experiment("name: a\n", Path("a.yaml"))
    prov = Provenance(RunDir(tmp_path), auto.counters, log=lambda m: None)
    guests = ExperimentGuests(Settings(), RunDir(tmp_path), auto, prov, log=lambda m: None)
    prov.decide(facts(accel="tcg", pmu=False))
    assert guests.cachemodel and guests.accel is None  # auto under TCG: the cache model
    prov.decide(facts(accel="kvm", pmu=True))
    assert not guests.cachemodel and guests.accel is None
