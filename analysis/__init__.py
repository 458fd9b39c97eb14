"""Analysis of a run directory: raw files -> tidy table -> statistics -> figures -> report.

The package holds no logic: the pipeline is `analysis.pipeline` (analyze_run,
write_report), the parts are its sibling modules (collate: the tidy table; stats: the
one comparison method; compare: the comparison tables; answer: the claims; plots,
report, repeatability, symbols). Import the module you need, never the package for a
sibling: importing `analysis` runs nothing (an import-linter contract in
pyproject.toml and tests/unit/test_analysis_imports.py hold it to that).

The package reads run folders only: it imports `testbed.formats` (the parsers),
`testbed.run.folder` (the layout) and the base modules, never the code that runs
guests, and importing it changes no process state.
"""
