"""Raw formats, one module per tool: the guest command that produces a raw file, the
file's name in a repetition folder, and the parser that turns it into a tidy frame.

netperf (netperf.txt), perfstat (perf-stat.csv), procfs (proc-before/ and
proc-after/: softirqs, interrupts, softnet_stat, snmp, stat), reader
(reader-cpus.txt), offloads (offloads.txt: who verifies RX checksums), cachemodel
(cachemodel.csv and the nbmark markers). Pure: no subprocess, no SSH, no run
folder; the runner writes these files and `analysis/` reads them through here.
"""
