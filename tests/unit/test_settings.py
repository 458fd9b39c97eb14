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


@pytest.mark.parametrize(("key", "value"), [("accel", "kvmm"), ("default_kernel", "linus")])
def test_settings_with_fixed_choices_are_checked(key, value):
    with pytest.raises(ConfigError, match=f"INVOKE_NETBED_{key.upper()}"):
        Settings.from_mapping({key: value})
    assert Settings.from_mapping({"accel": "tcg"}).accel == "tcg"
