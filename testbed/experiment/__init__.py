"""Experiment files -> validated models -> cells (pure; nothing here boots or runs).

yamlload   reading YAML safely, positions for `file:line:col` messages
config     the schema: Experiment, Axes, Combination, Cell, Workload, Limits
policies   the receive-path policies (data) and the guest commands that apply them
load       load_experiment: read, validate, cross-check against policies and the matrix
matrix     expansion (include/exclude), run order, shards, estimate, dry-run table
nicstate   diff_readback: a policy against the state read back from the guest
"""
