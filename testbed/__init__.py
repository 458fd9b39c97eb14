"""netbed: a full-system emulation testbed for Linux receive-path locality experiments.

Data flows one way through the sub-packages, and imports follow it (import-linter
contracts in pyproject.toml keep it so):

    experiment/  YAML -> validated Experiment -> cells (pure)
    build/       what guests boot from: image, kernels, cache-model plugin, host packages
    vm/          guests: QEMU argv (pure), processes, data plane, SSH connection
    run/         cells -> booted guests -> repetitions -> raw files in a run folder
    formats/     one module per tool: its guest command, raw file name and parser
    (analysis/)  raw files -> tidy tables -> statistics -> report; reads formats and
                 run.folder only

Base modules every layer may use: errors, settings, vocabulary (the shared names),
files (atomic writes), progress (Log), shell (the Shell protocol and HostShell),
runname (run-folder names, shared by validation and the runner).
"""

__version__ = "0.1.0"
