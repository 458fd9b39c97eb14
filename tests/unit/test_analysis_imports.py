"""Importing analysis has no side effects and loads none of the code that runs guests."""

from __future__ import annotations

import json
import sys

from testbed.settings import REPO_ROOT
from testbed.shell import HostShell

PROBE = """
import json, signal, sys
before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
import analysis
after = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
print(json.dumps({"signals_kept": before == after,
                  "modules": sorted(m for m in sys.modules if m.startswith("testbed"))}))
"""


def test_importing_analysis_keeps_signal_handlers_and_skips_the_runner():
    out = HostShell(cwd=REPO_ROOT).run([sys.executable, "-c", PROBE], timeout=120).stdout
    seen = json.loads(out)
    assert seen["signals_kept"]
    loaded = set(seen["modules"])
    assert not {m for m in loaded if m.startswith(("testbed.vm", "testbed.run.loop",
                                                   "testbed.build", "testbed.experiment"))}
    assert "testbed.run.folder" in loaded and "testbed.formats.procfs" in loaded
