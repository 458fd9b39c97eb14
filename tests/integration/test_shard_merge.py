"""Shard then merge gives the same cells and files as one unsharded run (real guests).

Kept cheap: 2 cells x 1 repetition of 2 s on one boot key, so the unsharded run
boots once and each shard once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from testbed.experiment.load import load_experiment
from testbed.experiment.matrix import expand, shard
from testbed.files import read_json
from testbed.run.folder import RunDir
from testbed.run.local import run_matrix
from testbed.run.merge import merge_runs
from testbed.settings import Settings

from .conftest import TINY_CONFIG

pytestmark = pytest.mark.integration

CONFIG = TINY_CONFIG.format(name="sharding")


def inventory(run: RunDir) -> set[tuple[str, int, frozenset[str]]]:
    """(cell id, repetition, file names relative to the rep folder) of finished reps."""
    return {(r.cell_id, r.repetition,
             frozenset(str(p.relative_to(r.path)) for p in r.path.rglob("*") if p.is_file()))
            for r in run.reps() if r.is_done}


def test_shards_merged_equal_the_unsharded_run(tmp_path: Path):
    config = tmp_path / "sharding.yaml"
    config.write_text(CONFIG)
    cells = expand(load_experiment(config))
    assert all(shard(cells, k, 2) for k in (1, 2)), "each shard must hold a cell"
    settings = replace(Settings(), results_dir=tmp_path / "results")

    whole = run_matrix(settings, config)
    parts = [run_matrix(settings, config, shard_spec=(k, 2)) for k in (1, 2)]
    for summary in (whole, *parts):
        assert summary.ok, summary.failed
    merged = RunDir(merge_runs([p.run_dir for p in parts], None, settings.results_dir))
    unsharded = RunDir(whole.run_dir)

    assert inventory(merged) == inventory(unsharded)
    assert {c for c, _, _ in inventory(merged)} == {c.cell_id for c in cells}
    assert sorted(c["cell_id"] for c in read_json(merged.cells_file)) == \
        sorted(c["cell_id"] for c in read_json(unsharded.cells_file))
    assert merged.experiment_file.read_bytes() == unsharded.experiment_file.read_bytes()
    for name in ("host.json", "versions.json", "policies.yaml"):
        assert (merged.path / name).is_file()
    assert read_json(merged.versions_file)["shards"] == [p.run_dir.name for p in parts]
