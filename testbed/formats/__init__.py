"""Raw formats, one module per tool: the guest command that produces a raw file, the
file's name in a repetition folder, and the parser that turns it into a tidy frame.

Each module declares the files it owns as constants (`RAW`, `RAW_BEFORE`, ...) and
lists them in `FILES`; the runner (testbed/run) writes and analysis/ reads them by
those constants only. `record` names the runner's own records (cell.json, done,
failed, the window script's markers, run-level files). tests/unit/test_raw_files.py
fails on a file of a captured run that no module declares. Pure: no subprocess, no
SSH, no run folder.
"""
