"""testbed.settings: invoke's `netbed` config section -> Settings, checked."""

from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.settings import REPO_ROOT, Settings


def test_settings_from_invoke_mapping_resolves_relative_dirs():
    s = Settings.from_mapping({"cache_dir": "somewhere", "guest_memory_mb": "2048",
                               "unknown": 1})
    assert s.cache_dir == REPO_ROOT / "somewhere"
    assert s.guest_memory_mb == 2048
    assert Settings.from_mapping({"cache_dir": "/abs"}).cache_dir == Path("/abs")


@pytest.mark.parametrize(("key", "value"), [("accel", "kvmm"), ("default_kernel", "Linus!")])
def test_settings_with_fixed_choices_are_checked(key, value):
    with pytest.raises(ConfigError, match=f"INVOKE_NETBED_{key.upper()}"):
        Settings.from_mapping({key: value})
    assert Settings.from_mapping({"accel": "tcg"}).accel == "tcg"


def test_default_kernel_may_be_any_variant_name() -> None:
    """Which variants exist is the kernels file's business (checked where it is used)."""
    assert Settings.from_mapping({"default_kernel": "my-patch.2"}).default_kernel == "my-patch.2"


@pytest.mark.parametrize("value", ["", "shift=auto", "shift=7", "shift=auto,sleep=off",
                                   "shift=0,align=on"])
def test_icount_setting_takes_qemus_forms(value):
    assert Settings.from_mapping({"tcg_icount": value}).tcg_icount == value


@pytest.mark.parametrize("value", ["auto", "shift=11", "shift=7 -S", "shift=auto;reboot"])
def test_bad_icount_is_refused_with_the_forms_it_takes(value):
    # the value lands on QEMU's command line: nothing beyond QEMU's own forms passes
    with pytest.raises(ConfigError, match="shift=auto or shift=N"):
        Settings.from_mapping({"tcg_icount": value})
