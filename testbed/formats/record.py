"""The runner's own records in a run folder: names only (pure).

Every other raw file is declared by the formats module that parses it (its `FILES`);
these are the files no parser reads as a measurement: the repetition's identity and
outcome, the window script's hand-shake markers and error logs, the serial logs kept
for failures, and the run-level records (testbed/run/folder.py describes the layout).
tests/unit/test_raw_files.py walks captured run folders and fails on any file that
no formats module declares, so a new raw file gets an owner and a constant.
"""

from __future__ import annotations

# A repetition's identity and outcome (testbed.run.repetition, testbed.run.folder).
CELL = "cell.json"          # the cell's axes plus the repetition number
POLICY = "policy.json"      # the resolved policy (what was applied)
DONE = "done"               # JSON, written last and atomically: the repetition is complete
FAILED = "failed"           # JSON, written instead of `done` when retries ran out

# The window script's hand-shake markers and logs (testbed.run.window).
ARMED = "armed"             # the trace is armed: the sender may start netperf
CLOSED = "closed"           # the inner script (every edge read) has ended
FINISHED = "finished"       # the whole window script has ended
ERROR = "error"             # why the window script gave up (the reader never appeared)
SETUP_TIMES = "setup-times.txt"     # guest uptime at each set-up step
SNAP_ERRORS = "nbsnap-errors.txt"   # nbsnap's complaints; the window is refused with them
INNER_ERRORS = "inner.err"          # stderr of the window's inner script (model windows)

# Serial and QEMU logs copied into a repetition that failed.
LOG_PATTERNS = ("console-*.log", "qemu-*.log")

FILES = (CELL, POLICY, DONE, FAILED, ARMED, CLOSED, FINISHED, ERROR, SETUP_TIMES,
         SNAP_ERRORS, INNER_ERRORS, *LOG_PATTERNS)

# Run-level records (testbed.run.folder.RunDir, testbed.run.merge, testbed.run.adaptive).
EXPERIMENT = "experiment.yaml"
POLICIES = "policies.yaml"
RUN = "run.json"
CELLS = "cells.json"
HOST = "host.json"
VERSIONS = "versions.json"
SUMMARY = "summary.txt"
SHARDS = "shards.json"
STOPPING = "stopping.json"
RUN_FILES = (EXPERIMENT, POLICIES, RUN, CELLS, HOST, VERSIONS, SUMMARY, SHARDS, STOPPING)
