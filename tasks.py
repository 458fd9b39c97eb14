"""netbed's invoke tasks: thin wrappers that parse arguments and call testbed/.

Settings live under the `netbed` namespace (see invoke.yaml); override them there,
in ~/.invoke.yaml, or with INVOKE_NETBED_<KEY> environment variables.

Each task imports the library it calls inside its body: `invoke --list` and
`--help` then start in a second instead of loading pandas, matplotlib and Fabric.
(There are no import cycles to dodge: `lint-imports` checks that.)
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from invoke import Collection, Context, Exit, task

from testbed.errors import NetbedError
from testbed.run.folder import disk_full, resolve_run
from testbed.settings import CONFIGS_DIR, REPO_ROOT, Settings


def settings_of(c: Context) -> Settings:
    return Settings.from_mapping(dict(c.config.get("netbed", {})))


def say(message: str) -> None:
    """Progress goes to stderr so a command's own output on stdout stays clean."""
    print(f"netbed: {message}", file=sys.stderr, flush=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user-facing errors into a clean message and exit status."""
    try:
        yield
    except NetbedError as exc:
        raise Exit(f"netbed: error: {exc}", code=2) from None
    except KeyboardInterrupt:
        raise Exit("netbed: interrupted; guests and devices were cleaned up", code=130) \
            from None


@contextmanager
def disk_full_in(where: Path, then: str) -> Iterator[None]:
    """A full disk while writing under `where`: a NetbedError naming the file and the free
    space (user_errors prints it, exit status 2), not a traceback. Files written before
    stay whole: every writer replaces files atomically."""
    try:
        yield
    except Exception as exc:
        full = disk_full(exc, where, then)
        if full is None:
            raise
        raise full from exc


@task(help={"json": "print the facts as JSON instead of a table",
            "no_probe": "skip the KVM probe boot (faster, but KVM usability stays unknown)"})
def doctor(c, json_=False, no_probe=False):
    """Print what this host can do: QEMU, KVM (probed), PMU, privileges, resources, and the
    kernel variants of configs/kernels.yaml (built or not)."""
    from dataclasses import asdict

    from testbed.build.kernels import variant_statuses
    from testbed.vm.hostfacts import facts_table, gather

    s = settings_of(c)
    with user_errors():
        facts = gather(s, log=(lambda m: None) if json_ else say, probe=not no_probe)
        variants = variant_statuses(s)
    if json_:
        print(json.dumps({**facts.to_dict(), "kernel_variants": [asdict(v) for v in variants]},
                         indent=2))
        return
    for key, value in facts_table(facts):
        print(f"{key:<18} {value}")
    for i, v in enumerate(variants):
        print(f"{'kernel variants' if i == 0 else '':<18} {v.text()}")


@task(help={"kernel": "kernel to prepare: distro or a variant of configs/kernels.yaml "
                      "(default from settings)"})
def setup(c, kernel=None):
    """Install system packages, build the guest image and fetch/build the kernel."""
    from testbed.vm.topology import prepare_assets

    s = settings_of(c)
    with user_errors():
        assets = prepare_assets(s, kernel or s.default_kernel, s.cache_dir / "setup", say)
    say(f"ready: image {assets.image.key}, kernel {assets.kernel.name} "
        f"{assets.kernel.release}, accelerator {assets.accel.upper()} ({assets.accel_reason})")


@task(help={
    "kernel": "distro (Debian's prebuilt) or a variant of configs/kernels.yaml (stock, "
              "patched, ...); built on demand",
    "nic": "data-plane NIC model: e1000, virtio or virtio-nocsum (default: none); as root "
           "on the experiments' tap + vnet_hdr data plane, else on a socket (no offloads)",
    "cpus": "number of vCPUs of the guest",
    "command": "run this command in the guest and exit with its status (default: a shell)",
    "with_sender": "also boot the sender guest on a private data plane (198.18.0.2; a "
                   "guest whatever the sender setting, so you can log into it)",
    "accel": "auto (probe KVM, else TCG), kvm or tcg",
    "memory": "guest memory in MiB",
})
def shell(c, kernel=None, nic=None, cpus=2, command=None, with_sender=False, accel=None,
          memory=None):
    """Boot a guest and open a shell in it, or run one command and exit with its status."""
    from testbed.run import hostlock
    from testbed.vm.process import shell_workdir_prefix, sweep_stale_workdirs
    from testbed.vm.topology import boot, prepare_assets
    from testbed.vocabulary import nic_name

    s = settings_of(c)
    # A shell does not wait for the host lock (it may stay open for hours), but says
    # when its guests will take CPU from a measuring run.
    if (holder := hostlock.current_holder()) is not None:
        say(f"note: a measuring run is going on ({holder.describe()}): this shell's guests "
            "share the host's CPUs with it and change its figures")
    with user_errors():
        nic = nic_name(nic) if nic is not None else None
        if accel is not None:
            s = Settings.from_mapping({**s.as_invoke_config(), "accel": accel})  # checks it
    s = replace(s, sender="guest")  # --with-sender promises a guest
    s.cache_dir.mkdir(parents=True, exist_ok=True)
    # One folder per invocation: two shells at once must not share console logs or sockets.
    # Named by our pid: folders of shells that died are swept here.
    sweep_stale_workdirs(s.cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix=shell_workdir_prefix(), dir=s.cache_dir))
    status = 0
    try:
        with user_errors():
            assets = prepare_assets(s, kernel or s.default_kernel, workdir, say, accel)
            with boot(assets, s, workdir / "guests", cpus=int(cpus), nic=nic,
                      with_sender=with_sender, memory_mb=int(memory) if memory else None,
                      log=say) as topo:
                if "dataplane" in topo.notes:
                    say(dataplane_line(topo.notes["dataplane"]))
                guest = topo.receiver.ssh
                if command is None:
                    say(f"interactive shell in {guest.name}; exit it to shut the guests down")
                    status = subprocess.call(guest.ssh_argv())
                else:
                    res = guest.run(command, check=False)
                    sys.stdout.write(res.stdout)
                    sys.stderr.write(res.stderr)
                    status = res.exit_code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if status:
        raise Exit(code=status)


def dataplane_line(note: str) -> str:
    """What `invoke shell` says about the data NIC's attachment, so nobody probing the
    guest mistakes a socket data plane (no vnet header, no offloads) for the tap one
    experiments run on as root."""
    if note.startswith("socket"):
        return (f"data plane: {note}. NOT what experiments measure as root (tap with "
                "vnet_hdr, where virtio has RX checksum offload): run as root to get it")
    return f"data plane: {note} (as in experiments)"


# Tiers and the pytest markers each leaves out (pyproject.toml registers the markers).
TEST_TIERS = {
    "unit": "not process and not integration and not slow and not browser",
    "local": "not integration and not slow and not browser",
    "default": "not slow",
    "full": None,
}


@task(help={
    "tier": "unit (pure logic, seconds), local (adds tests that start processes, compile "
            "C or open sockets on this host), default (adds real guests under TCG and the "
            "report in Chromium: what CI runs), full (adds slow tests: kernel builds, "
            "cache-model validation, long runs)",
    "k": "only tests matching this pytest -k expression",
    "args": "extra pytest arguments, quoted",
})
def test(c, tier="default", k=None, args=""):
    """Run the test suite (default tier: what CI runs), installing what its tests call.

    The Debian packages the tier's tests call are installed on first use, as run-matrix
    does for its own, so on a fresh machine those tests run instead of skipping."""
    from testbed.build.sysdeps import ensure_packages, tier_packages

    if tier not in TEST_TIERS:
        raise Exit(f"netbed: error: unknown tier {tier!r}; use {', '.join(TEST_TIERS)}")
    with user_errors():
        packages = tier_packages(tier)
        if tier == "full":  # the kernel tests read the source package before they build
            from testbed.build.kernel_build import BUILD_PACKAGES, SOURCE_PACKAGE, SOURCE_TARBALL
            packages.update(BUILD_PACKAGES)
            packages[SOURCE_PACKAGE] = str(SOURCE_TARBALL)  # the 6.1 base's source
        ensure_packages(packages, say)
    cmd = [sys.executable, "-m", "pytest"]
    if TEST_TIERS[tier]:
        cmd += ["-m", TEST_TIERS[tier]]
    if k:
        cmd += ["-k", k]
    cmd += args.split()
    say(" ".join(cmd))
    result = subprocess.call(cmd, cwd=REPO_ROOT)
    if result:
        raise Exit(code=result)


@task(help={"kernel": "kernels to boot, comma-separated (distro or variants of "
                      "configs/kernels.yaml)",
            "nic": "NIC models, comma-separated (e1000,virtio,virtio-nocsum)",
            "cpus": "vCPUs", "boots": "how many boots to take the median of"})
def bench_boot(c, kernel=None, nic="e1000", cpus=2, boots=3):
    """Print boot-to-SSH-ready time (median of several boots) per kernel and NIC."""
    from benchmarks.boot import run_boot_benchmark
    from testbed.run import hostlock

    s = settings_of(c)
    with user_errors(), hostlock.held("bench-boot", log=say):
        for k in (kernel or s.default_kernel).split(","):
            for n in nic.split(","):
                run_boot_benchmark(s, k.strip(), n.strip(), int(cpus), int(boots), say)


@task(help={
    "variant": "a variant of the kernels file, several comma-separated, or all (the "
               "default; unpatched ones first: patched ones reuse their base's objects)",
    "kernels_file": "kernels file (default: configs/kernels.yaml)",
    "json": "print the built kernels' metadata as JSON instead of a summary",
})
def build_kernel(c, variant="all", kernels_file=None, json_=False):
    """Build guest kernel variants of the kernels file (cached; prints each build's time)."""
    from testbed.build.kernel_build import ensure_built
    from testbed.build.kernels import build_order
    from testbed.experiment.kernelfile import DEFAULT_KERNELS_FILE, load_kernels

    s = settings_of(c)
    built = {}
    with user_errors():
        kernels = load_kernels(Path(kernels_file) if kernels_file else DEFAULT_KERNELS_FILE)
        for v in build_order([n.strip() for n in variant.split(",")], kernels):
            k = ensure_built(v, s, (lambda m: None) if json_ else say, kernels)
            built[v.name] = {"bzimage": str(k.bzimage), **k.metadata}
            if not json_:
                say(f"{v.name}: {k.release}  {k.bzimage}  (built in "
                    f"{k.metadata['build_seconds']} s at {k.metadata['built_at']})")
    if json_:
        print(json.dumps(built, indent=2, sort_keys=True))


# `run` is a flag, not a positional argument: invoke hands a positional argument the
# next word even when it is -h or --help, and those must mean help in every task.
RUN_HELP = "run folder, run id under results/, or 'latest' (the default)"
BASELINE_HELP = ("axis=value pairs to compare against (default policy=default: each cell "
                 "against the default policy of its own NIC, kernel and other axes)")


@task(help={"run": RUN_HELP, "baseline": BASELINE_HELP})
def analyze(c, run=None, baseline=None):
    """Collate a run's raw files into tidy tables (<run>/analysis/) and print the comparison."""
    from analysis import pipeline

    with user_errors():
        path = resolve_run(run or "latest", settings_of(c).results_dir)
        with disk_full_in(path / "analysis", f"analyze again: invoke analyze --run {path}"):
            res = pipeline.analyze_run(path, pipeline.parse_baseline(baseline))
    print(res.text_table, end="")
    say(f"{len(res.tidy)} rows, repetitions {res.counts}; tables in {res.tables.parquet.parent}")


@task(help={
    "run": RUN_HELP,
    "compare": "another run (folder or id) to compare against, as the base",
    "baseline": BASELINE_HELP,
    "force": "compare with --compare even when the runs differ in QEMU, cache-model "
             "plugin, kernel build or image (the report lists the differences)",
})
def report(c, run=None, compare=None, baseline=None, force=False):
    """Write <run>/analysis/report.html (self-contained) and report.md."""
    from analysis import pipeline

    s = settings_of(c)
    with user_errors():
        path = resolve_run(run or "latest", s.results_dir)
        other = resolve_run(compare, s.results_dir) if compare else None
        with disk_full_in(path / "analysis", f"write it again: invoke report --run {path}"):
            paths = pipeline.write_report(path, other, pipeline.parse_baseline(baseline),
                                          force=force)
    print(paths.html)
    say(f"markdown: {paths.md}")


@task(help={
    "config": "experiment YAML (default: configs/quick.yaml); - reads it from standard input",
    "resume": "run folder, run id or 'latest' to resume: runs only the repetitions without "
              "a done marker",
    "shard": "K/N: run a deterministic share of the cells (for CI runners)",
    "dry_run": "print the expanded cells and an estimated duration; boot nothing",
    "no_report": "skip the analysis tables and report at the end",
    "inject_fault": "testing only: KIND:<cell-id> with KIND hang (QMP stop), kill-qemu "
                    "(SIGKILL the receiver's QEMU mid-window) or kill-netserver (in the "
                    "guest, mid-window); on that cell's first attempt only, except hang",
    "no_wait": "if another measuring run holds this host, exit with status 2 at once "
               "instead of waiting for it",
})
def run_matrix(c, config=None, resume=None, shard=None, dry_run=False, no_report=False,
               inject_fault=None, no_wait=False):
    """Run an experiment matrix (default configs/quick.yaml) into results/<run-id>/."""
    from analysis import pipeline
    from testbed.experiment.load import load_experiment
    from testbed.experiment.matrix import (
        cells_table,
        estimate_seconds,
        expand,
        format_duration,
        parse_shard,
        planned_plain,
    )
    from testbed.experiment.matrix import shard as take_shard
    from testbed.run.local import run_matrix as run_locally
    from testbed.run.loop import summary_text
    from testbed.run.session import Fault

    s = settings_of(c)
    path = Path(config) if config else CONFIGS_DIR / "quick.yaml"
    with user_errors():
        shard_spec = parse_shard(shard) if shard else None
        if dry_run:
            exp = load_experiment(path)
            for warning in exp.warnings:
                say(warning)
            cells = expand(exp)
            if shard_spec:
                cells = take_shard(cells, *shard_spec)
            print(cells_table(exp, cells))
            print(f"{len(cells)} cells x {exp.repetitions_text(planned_plain(exp))}; estimated "
                  f"{format_duration(estimate_seconds(exp, cells))}")
            return
        summary = run_locally(s, None if resume else path, resume=resume, shard_spec=shard_spec,
                              fault=Fault.parse(inject_fault), log=say, wait=not no_wait)
    print(summary_text(summary, 0).replace("time: 0 s\n", ""), end="")
    if not no_report and summary.done + summary.skipped > 0:
        try:
            paths = pipeline.write_report(summary.run_dir)  # analyses the run, then reports
            if paths.claims is not None:
                print(paths.claims.read_text(), end="")
            say(f"full comparison: {paths.html.parent / 'comparison.txt'}")
            say(f"report: {paths.html}")
        except Exception as exc:  # the raw results are safe; say what broke
            full = disk_full(exc, summary.run_dir / "analysis",
                             f"write the report again: invoke report --run {summary.run_dir}")
            if full is not None:
                raise Exit(f"netbed: error: the report was not written: {full}; the "
                           f"repetitions are complete in {summary.run_dir}", code=2) from None
            raise Exit(f"netbed: error: analysis failed ({exc}); raw results are in "
                       f"{summary.run_dir}; retry with: invoke report --run {summary.run_dir}",
                       code=1) from None
    if not summary.ok:
        raise Exit(f"netbed: {len(summary.failed)} repetition(s) failed; see "
                   f"{summary.run_dir}/summary.txt", code=1)


# Long flags only: automatic short flags would give --hosts `-h`, which is help everywhere.
@task(auto_shortflags=False, help={
    "hosts": "user@h1,user@h2[:port]: host i of N runs shard i/N over SSH; pulled and merged",
    "config": "experiment YAML (default: configs/quick.yaml)",
    "key": "SSH private key (default: ssh agent, ~/.ssh/config, ~/.ssh keys)",
    "remote_dir": "per-run folders on the hosts go under this (relative to home, or absolute)",
    "netbed": "netbed is already checked out and installed at this path on every host: "
              "ship nothing",
    "no_install": "do not pip install the shipped checkout (the host's python has netbed's "
                  "dependencies)",
    "python": "python on the hosts (the venv is made from it)",
    "cache_dir": "INVOKE_NETBED_CACHE_DIR on the hosts, e.g. to share one image cache",
    "parallel": "how many hosts run at once (default: all)",
    "no_report": "skip the analysis tables and report of the merged run",
})
def run_hosts(c, hosts=None, config=None, key=None, remote_dir="netbed-runs", netbed=None,
              no_install=False, python="python3", cache_dir=None, parallel=0,
              no_report=False):
    """Run an experiment over several (KVM) hosts by SSH: one shard each, pulled and merged."""
    from analysis import pipeline
    from testbed.run.remote import RemoteOptions, parse_hosts, run_on_hosts

    if not hosts:
        raise Exit("netbed: error: name the hosts: --hosts user@h1,user@h2[:port]", code=2)
    s = settings_of(c)
    options = RemoteOptions(remote_root=remote_dir, netbed_path=netbed,
                            install=not no_install, python=python, key_filename=key,
                            cache_dir=cache_dir, parallel=int(parallel) or None)
    # Started with `&`, a process inherits SIGINT ignored and Python installs no handler;
    # this task boots no guests (which would install netbed's), so take Ctrl-C back here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with user_errors():
        summary = run_on_hosts(s, Path(config) if config else CONFIGS_DIR / "quick.yaml",
                               parse_hosts(hosts), options, log=say)
    print(summary.text(), end="")
    if not no_report and summary.merged is not None:
        with user_errors():
            paths = pipeline.write_report(summary.merged)
        if paths.claims is not None:
            print(paths.claims.read_text(), end="")
        say(f"report: {paths.html}")
    if not summary.ok:
        raise Exit(f"netbed: {sum(not o.ok for o in summary.outcomes)} host(s) failed or "
                   f"had failed repetitions; merged what exists", code=1)


@task(iterable=["runs"], help={
    "runs": "a shard run folder or id to join; repeat: --runs A --runs B",
    "into": "folder for the merged run (default: results/<first id>-merged)",
})
def merge_results(c, runs=None, into=None):
    """Join shard runs of one experiment into a single run folder."""
    from testbed.run.merge import merge_runs

    s = settings_of(c)
    with user_errors():
        out = merge_runs([resolve_run(r, s.results_dir) for r in runs or []],
                         Path(into) if into else None, s.results_dir)
    say(f"merged {len(runs or [])} runs into {out}")


@task(help={"force": "recompile even when a plugin for these sources is cached"})
def build_cachemodel(c, force=False):
    """Build the cache-model TCG plugin against the selected QEMU's header (setting `qemu`);
    print its path."""
    from testbed.build.cachemodel_plugin import build_plugin

    with user_errors():
        print(build_plugin(settings_of(c), say, force=force))


@task(help={"json": "print the manifest (version, packages, sha256 of each .deb) as JSON"})
def build_qemu(c, json_=False):
    """Fetch and unpack the bookworm-backports QEMU into the cache (once), beside the host's.

    It is the default (`qemu: backport`), fetched by the first run that needs it; this
    task does it ahead and fails if it cannot (a run falls back to the host's QEMU and
    says so). The host's QEMU and apt configuration are left as they are.
    """
    from testbed.build.qemu_backport import ensure_backport, read_manifest

    s = settings_of(c)
    with user_errors():
        install = ensure_backport(s, say)
    manifest = read_manifest(s)
    assert manifest is not None
    if json_:
        print(manifest.to_json(), end="")
        return
    print(f"QEMU {install.version}: {install.binary}")
    for deb in manifest.debs:
        print(f"  {deb.package} {deb.version}  sha256 {deb.sha256}")


ns = Collection(doctor, setup, shell, test, bench_boot, run_matrix, run_hosts, merge_results)
ns.add_task(build_kernel)
ns.add_task(analyze)
ns.add_task(report)
ns.add_task(build_cachemodel)
ns.add_task(build_qemu)
ns.configure({"netbed": Settings().as_invoke_config()})
