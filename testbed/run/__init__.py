"""A run: cells -> booted guests -> measured repetitions -> raw files in a run folder.

folder (the run folder's layout and lookup: the contract with `analysis/`), local
(open or resume a run folder, then run the loop), loop (resume, retries, boot
reuse; collaborators passed in, so it is unit-tested with fakes), bootcache,
session (the real collaborators: boot guests, measure, keep logs), repetition (one
repetition on two Shells), provenance (host.json, versions.json), cachemodel_window
(the model's counters per window), remote (shards over SSH hosts), merge (shards
-> one run).
"""
