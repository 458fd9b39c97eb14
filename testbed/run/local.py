"""A matrix run on this host: open (or resume) the run folder, then run the loop.

`open_run` is where a run folder is born: the experiment and its policies are
copied in, `run.json` records the shard (and, once the host's counter plan is known,
the plain repetitions per cell), and `cells.json` the cells this run owns; a resumed
run reads all of that back, so it runs exactly what it started.
`run_matrix` wires the real collaborators (`testbed.run.session`) into the loop.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from testbed import timings
from testbed.build import kernel_build
from testbed.build.beside import Beside, image_job, plugin_job
from testbed.build.cachemodel_plugin import BUILD_PACKAGES as PLUGIN_PACKAGES
from testbed.build.kernel_build import ensure_built, find_built_named
from testbed.build.kernels import build_order
from testbed.build.sysdeps import GUEST_PACKAGES, ensure_packages
from testbed.errors import NetbedError
from testbed.experiment.config import Cell, Experiment
from testbed.experiment.kernelfile import KernelSet, load_kernels
from testbed.experiment.load import load_experiment
from testbed.experiment.matrix import expand, round_order, schedule, shard
from testbed.experiment.policies import DEFAULT_POLICIES_FILE, PolicySet, load_policies
from testbed.files import atomic_write_json, atomic_write_text, read_json
from testbed.progress import Log
from testbed.run import hostlock
from testbed.run.adaptive import Rule
from testbed.run.folder import RunDir, disk_full, new_run_id, resolve_run
from testbed.run.loop import AdaptivePlan, MatrixRunner, RunSummary, summary_text
from testbed.run.provenance import Provenance, counter_plan, model_may_count, netbed_commit
from testbed.run.session import ExperimentGuests, Fault
from testbed.settings import Settings
from testbed.vm.hostfacts import HostFacts, gather, known_kvm_verdict, refresh_plugin_api
from testbed.vm.topology import plan_assets, run_kernels
from testbed.vocabulary import DISTRO_KERNEL

Shard = tuple[int, int]


def open_run(settings: Settings, config: Path | None, resume: str | None,
             shard_spec: Shard | None, check: Callable[[Experiment], None] = lambda e: None,
             ) -> tuple[RunDir, Experiment, list[Cell]]:
    """A new run folder for `config`, or the existing one to resume; cells of this shard.
    `check` sees a new run's experiment before its folder is made (host-dependent checks)."""
    if resume:
        run = RunDir(resolve_run(resume, settings.results_dir))
        if not run.experiment_file.is_file():
            raise NetbedError(f"{run.path} is not a netbed run (no experiment.yaml)",
                              hint=f"pass a folder or run id under {settings.results_dir}")
        kernels = _kernels_of(run)
        exp = load_experiment(run.experiment_file, _policies_of(run, kernels), kernels)
        shard_spec = _shard_of(read_json(run.meta_file))
    else:
        if config is None:
            raise NetbedError("run_matrix needs an experiment file or a run to resume")
        exp = load_experiment(config)  # `-` reads standard input: keep the text validated
        check(exp)
        run = RunDir(settings.results_dir / new_run_id(exp.name, shard_spec))
        run.path.mkdir(parents=True)
        atomic_write_text(run.experiment_file, exp.source_text or "")
        # the run carries its policies: the file validation resolved (`~`, relative paths)
        shutil.copy2(exp.policies_path or DEFAULT_POLICIES_FILE, run.policies_file)
        atomic_write_json(run.meta_file, {"shard": list(shard_spec) if shard_spec else None,
                                          "config": str(config),
                                          "kernels_file": str(exp.kernels.path.resolve())})
    cells = expand(exp)
    if shard_spec:
        cells = shard(cells, *shard_spec)
    atomic_write_json(run.cells_file, [{**json.loads(c.model_dump_json()),
                                        "cell_id": c.cell_id} for c in cells])
    return run, exp, cells


def _shard_of(meta: dict[str, object]) -> Shard | None:
    value = meta.get("shard")
    if isinstance(value, list) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def _plain_of(run: RunDir, resumed: bool, planned: int) -> int:
    """Plain repetitions per cell: a new run records what its host's plan gives in
    run.json; a resumed run keeps what it started with (none for a run from before plain
    repetitions existed), so a resume adds no work the run never had."""
    meta = read_json(run.meta_file)
    if resumed:
        value = meta.get("plain_repetitions", 0)
        return value if isinstance(value, int) else 0
    atomic_write_json(run.meta_file, {**meta, "plain_repetitions": planned})
    return planned


def _kernels_of(run: RunDir) -> KernelSet:
    """The kernels file a run was started with (run.json; its patches are where it names
    them); a run from before kernels files, or whose file is gone, gets the default."""
    path = read_json(run.meta_file).get("kernels_file")
    if isinstance(path, str) and Path(path).is_file():
        return load_kernels(Path(path))
    return load_kernels()


def _policies_of(run: RunDir, kernels: KernelSet | None = None) -> PolicySet | None:
    return (load_policies(run.policies_file, kernels) if run.policies_file.is_file()
            else None)


def build_kernels(settings: Settings, exp: Experiment, cells: list[Cell], log: Log) -> None:
    """Build (or find in the cache) every kernel the cells boot, before any cell runs: a
    patch that does not apply or an option Kconfig drops stops the run here. Unpatched
    variants first: a patched one built after its base's tree recompiles only what its
    patches touch, one built before it compiles from fresh source (the tree is compiled
    later anyway, so that would cost a whole compile more)."""
    for variant in build_order(_built_kernels(cells), exp.kernels):
        ensure_built(variant, settings, log, exp.kernels)


def _built_kernels(cells: Sequence[Cell]) -> list[str]:
    """The kernels the cells boot that netbed builds (all but Debian's), in first use."""
    return [name for name in run_kernels(cells) if name != DISTRO_KERNEL]


def run_packages(exp: Experiment, to_build: Sequence[str]) -> dict[str, str]:
    """Every Debian package (-> its probe) the run's builds and boots may install, asked
    for in one apt call before they start (pure): one `apt-get update` instead of one per
    build, and the builds running side by side (testbed.build.beside) find them there.
    The plugin's packages come with counters that may resolve to the cache model (before
    the KVM probe it is not known whether `auto` will)."""
    packages = dict(GUEST_PACKAGES)
    for name in to_build:
        packages.update(kernel_build.BUILD_PACKAGES)
        deb = exp.kernels.variant(name).base.debian
        if deb is not None and deb.suite is None:  # installed from the host's own suite
            packages[deb.package] = deb.tarball
    if {"auto", "cachemodel"} & set(exp.counters):
        packages.update(PLUGIN_PACKAGES)
    return packages


def probe_kernels(exp: Experiment, cells: Sequence[Cell]) -> tuple[str, ...]:
    """The run's kernels in the order they are built (build_order: unpatched first), for
    the KVM probe, which boots the first one that is built or builds it: so a probe
    never builds a patched variant from fresh source before its base's tree."""
    return (*(v.name for v in build_order(_built_kernels(cells), exp.kernels)),
            *(n for n in run_kernels(cells) if n == DISTRO_KERNEL))


def kernels_to_build(settings: Settings, exp: Experiment, cells: Sequence[Cell]) -> list[str]:
    """The built kernels the cells boot that are not in the cache yet."""
    return [name for name in _built_kernels(cells)
            if find_built_named(name, settings, exp.kernels) is None]


def adaptive_plan(exp: Experiment, cells: list[Cell]) -> AdaptivePlan | None:
    """The loop's adaptive rounds for `repetitions: {min, max, target_cv, metric}` (#11)."""
    a = exp.adaptive
    if a is None:
        return None
    return AdaptivePlan(Rule(a.min, a.max, a.target_cv), a.metric,
                        lambda r: round_order(exp, cells, r))


def run_matrix(settings: Settings, config: Path | None, *, resume: str | None = None,
               shard_spec: Shard | None = None, fault: Fault | None = None,
               log: Log = print, wait: bool = True) -> RunSummary:
    """Run (or resume) an experiment into its run folder; returns what happened.

    The whole run holds the host lock (testbed.run.hostlock): a second run waits for
    it, or with `wait` False raises HostBusy. The counter plan is decided from the
    host's facts before the run folder is made, so a config this host cannot count
    (`hardware` without a PMU) leaves nothing. Before the first boot the session builds
    exactly what its pending repetitions need (testbed.vm.topology.plan_assets); every
    step's time goes to timings.json."""
    label = f"resuming {resume}" if resume else f"new run of {config}"
    with hostlock.held(label, wait=wait, log=log) as lock:
        try:
            with timings.recording(timings.Timings()) as steps:
                return _run_locked(settings, config, resume, shard_spec, fault, log, lock,
                                   steps)
        except OSError as exc:  # (the loop says this itself for what a repetition writes)
            full = disk_full(exc, settings.results_dir,
                             "resume the run: invoke run-matrix --resume <its folder>")
            if full is None:
                raise
            raise full from exc


def _run_locked(settings: Settings, config: Path | None, resume: str | None,
                shard_spec: Shard | None, fault: Fault | None, log: Log,
                lock: hostlock.HostLock, steps: timings.Timings) -> RunSummary:
    facts: list[HostFacts] = []

    def check_host(exp: Experiment) -> None:
        """Before the run folder exists: the host packages in one apt call, the host's
        facts (the KVM probe boots one of the run's kernels, building it first), the
        counter plan (a ConfigError leaves nothing), then the other kernels. The image
        and the plugin are built beside them: the plugin from the start when the model
        may count (before the probe, `auto` on a host whose KVM verdict is not known
        yet; a KVM host builds it once for nothing, on idle cycles), else once the plan
        says the model counts."""
        cells = expand(exp)
        cells = shard(cells, *shard_spec) if shard_spec else cells
        with timings.step("packages", "host packages"):
            ensure_packages(run_packages(exp, kernels_to_build(settings, exp, cells)), log)
        with Beside(log) as side:
            side.add(image_job(settings, log))
            known = known_kvm_verdict(settings)
            early = model_may_count(exp.counters, None if known is None else known.usable)
            if early:
                side.add(plugin_job(settings, log))
            facts.append(gather(settings, log=log, kernels=probe_kernels(exp, cells)))
            plan = counter_plan(exp.counters, facts[0].accel, facts[0].pmu)
            if plan.cachemodel and not early:
                side.add(plugin_job(settings, log))
            build_kernels(settings, exp, cells, log)
        if plan.cachemodel:  # the plugin build fetched the header gather found missing
            facts[0] = refresh_plugin_api(facts[0], settings)

    run, exp, cells = open_run(settings, config, resume, shard_spec, check_host)
    lock.rename(run.run_id)
    steps.attach(run.path / timings.TIMINGS_FILE)
    for warning in exp.warnings:
        log(warning)
    if not facts:  # a resumed run: the plan (and with it the plain repetitions) needs them
        facts.append(gather(settings, log=log, kernels=run_kernels(cells)))
    provenance = Provenance(run, exp.counters, log)
    provenance.decide(facts[0])
    guests = ExperimentGuests(settings, run, exp, provenance, log, fault)
    plain = _plain_of(run, resume is not None, guests.plain_repetitions)
    log(f"run {run.run_id}: {len(cells)} cells x {exp.repetitions_text(plain)} -> {run.path}")
    started = time.monotonic()
    items = schedule(exp, cells, plain=plain)
    pending = [(c, r) for c, r in items if not run.rep(c.cell_id, r).is_done]

    def start() -> None:
        provenance.record_host(facts[0], netbed_commit())
        guests.prepare(plan_assets(pending, guests.cachemodel, guests.is_plain))

    collaborators = guests.collaborators(start=start)
    summary = MatrixRunner(run, items, exp.retries, collaborators, log,
                           adaptive_plan(exp, cells)).execute()
    atomic_write_text(run.summary_file, summary_text(summary, time.monotonic() - started))
    return summary
