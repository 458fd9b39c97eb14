"""testbed.build.sysdeps: what is missing, and what to run when we may not install it."""

import os

import pytest

from testbed.errors import NetbedError


def test_missing_packages_without_root_names_the_apt_line(monkeypatch):
    from testbed.build import sysdeps

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetbedError, match="apt-get install -y -q --no-install-recommends "
                                          "netbed-no-such-pkg"):
        sysdeps.ensure_packages({"netbed-no-such-pkg": "netbed-no-such-command"})
