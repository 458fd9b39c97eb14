"""Fixtures shared by the unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.settings import REPO_ROOT


@pytest.fixture(scope="session")
def model_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cachemodel/plugin/model_trace.c compiled (gcc, well under a second): the cache
    model driven by text traces, without QEMU."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("model") / "model_trace"
    src = REPO_ROOT / "cachemodel" / "plugin"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out), str(src / "model_trace.c"),
                    str(src / "model.c"), str(src / "payload.c")], check=True)
    return out


FIXTURE_KERNELS = Path(__file__).resolve().parent.parent / "fixtures" / "configs" / "kernels" \
    / "good.yaml"


@pytest.fixture
def fixture_kernels(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Validate against tests/fixtures/configs/kernels/good.yaml (stock, patched) instead of
    configs/kernels.yaml, so expected messages do not change when the shipped file grows."""
    from testbed.experiment import kernelfile

    monkeypatch.setattr(kernelfile, "DEFAULT_KERNELS_FILE", FIXTURE_KERNELS)
    return FIXTURE_KERNELS
