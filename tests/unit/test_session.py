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
