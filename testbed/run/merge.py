"""Join the shard runs of one experiment into a single run folder.

Shards of one experiment partition its cells, so a repetition appears in at most
one shard as done; finding it done twice means the inputs are not shards of one
run, and we stop rather than guess. The merged folder is built aside and renamed
into place, so a failed merge leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from testbed.errors import NetbedError
from testbed.files import atomic_write_json, read_json
from testbed.formats import record
from testbed.run.folder import CELLS_DIR, RunDir

SHARD_SUFFIX_SEP = "-shard"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def merged_name(run_ids: list[str]) -> str:
    """`<first id without its shard suffix>-merged` (pure)."""
    return run_ids[0].split(SHARD_SUFFIX_SEP, 1)[0] + "-merged"


def merge_runs(inputs: list[Path], into: Path | None, results_dir: Path) -> Path:
    if len(inputs) < 1:
        raise NetbedError("merge-results needs at least one run", hint="name the shard runs")
    runs = [RunDir(p) for p in inputs]
    for run in runs:
        if not run.experiment_file.is_file():
            raise NetbedError(f"{run.path} is not a netbed run (no experiment.yaml)")
    first = _digest(runs[0].experiment_file)
    differing = [str(r.path) for r in runs[1:] if _digest(r.experiment_file) != first]
    if differing:
        raise NetbedError(f"these runs ran a different experiment file than {runs[0].path}: "
                          f"{', '.join(differing)}", hint="merge only shards of one experiment")
    out = into or results_dir / merged_name([r.run_id for r in runs])
    if out.exists():
        raise NetbedError(f"{out} exists already", hint="pass another --into or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_s:
        tmp = Path(tmp_s) / out.name
        (tmp / CELLS_DIR).mkdir(parents=True)
        shutil.copy2(runs[0].experiment_file, tmp / "experiment.yaml")
        if (runs[0].path / "policies.yaml").is_file():
            shutil.copy2(runs[0].path / "policies.yaml", tmp / "policies.yaml")
        cells: dict[str, dict[str, Any]] = {}
        done_in: dict[tuple[str, int], Path] = {}
        for run in runs:
            for cell in read_json(run.cells_file) if run.cells_file.is_file() else []:
                cells.setdefault(cell["cell_id"], cell)
            for rep in run.reps():
                key = (rep.cell_id, rep.repetition)
                target = tmp / CELLS_DIR / rep.cell_id / f"rep-{rep.repetition}"
                if rep.is_done and key in done_in:
                    raise NetbedError(
                        f"{rep.cell_id} rep {rep.repetition} is done in both "
                        f"{done_in[key]} and {run.path}", hint="these runs are not disjoint shards")
                if not rep.is_done and target.exists():
                    continue  # an unfinished copy never replaces one already placed
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(rep.path, target)
                if rep.is_done:
                    done_in[key] = run.path
        atomic_write_json(tmp / record.CELLS, list(cells.values()))
        shards = []
        for run in runs:
            shards.append({
                "run": run.run_id,
                "host": read_json(run.host_file) if run.host_file.is_file() else None,
                "versions": read_json(run.versions_file) if run.versions_file.is_file()
                else None,
            })
        for name in (record.HOST, record.VERSIONS):
            src = runs[0].path / name
            data = json.loads(src.read_text()) if src.is_file() else {}
            data["shards"] = [s["run"] for s in shards]
            atomic_write_json(tmp / name, data)
        atomic_write_json(tmp / record.SHARDS, shards)
        # plain (plugin-less) repetitions per cell, as the shards recorded them: a resume
        # of the merged run redoes the ones that failed (testbed.run.local)
        plain = [read_json(r.meta_file).get("plain_repetitions", 0)
                 for r in runs if r.meta_file.is_file()]
        atomic_write_json(tmp / record.RUN, {"shard": None,
                                             "merged_from": [str(r.path) for r in runs],
                                             "plain_repetitions": max(
                                                 [p for p in plain if isinstance(p, int)],
                                                 default=0)})
        tmp.rename(out)
    return out
