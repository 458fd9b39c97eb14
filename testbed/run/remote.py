"""Run one experiment over several (KVM) hosts via SSH, then pull and merge the shards.

Host i of N runs `invoke run-matrix --shard i/N --no-report` in a netbed checkout
on that host: the same code path as a local run, so a remote shard folder is an
ordinary run folder. Unless told that netbed is already installed there, the
exact local commit is shipped (a `git bundle` put over SFTP into a per-run
folder and cloned, so the remote run records the same commit in versions.json),
along with the experiment file and its policies file. Each host's progress lines
stream back prefixed with its label; its run folder comes back as a tarball over
SFTP, and the shards that exist are merged locally with `testbed.run.merge.merge_runs`.
A host that fails is reported and the merge holds what the others produced.

Paths on the remote are kept per assignment (`<remote_root>/<run tag>/<k>-<host>/`),
so two assignments on one machine (e.g. tests against 127.0.0.1) never collide.
The pure parts (host parsing, shard assignment, remote commands, line prefixing)
are separate from the effects (Fabric connections, git, tar) and unit-tested.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fabric import Connection
from invoke.runners import Result

from testbed.errors import NetbedError
from testbed.experiment.kernelfile import PATCHES_DIR, KernelSet
from testbed.experiment.load import load_experiment
from testbed.progress import Log
from testbed.run.folder import new_run_id
from testbed.run.merge import merge_runs
from testbed.settings import REPO_ROOT, Settings
from testbed.shell import HostShell

BUNDLE_NAME = "netbed.bundle"
PID_FILE = "run.pid"
PACK_NAME = "results.tar.gz"
# Where the run folder's scratch space lives; never worth pulling back.
WORK_DIR = ".work"

_HOST_RE = re.compile(
    r"""^(?:(?P<user>[^@:\s/\[\]]+)@)?          # optional user@
        (?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^@:\s/\[\]]+))  # [v6] or name/IPv4
        (?::(?P<port>\d+))?$""",
    re.VERBOSE,
)


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class HostSpec:
    """One `--hosts` entry: [user@]host[:port], IPv6 in brackets ([::1]:2222)."""

    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{host}{port}"


def parse_hosts(text: str) -> list[HostSpec]:
    """'user@h1,user@h2:2222' -> HostSpecs; a bad entry is a NetbedError naming it.

    A host may repeat (two shards on one big machine, or tests on 127.0.0.1):
    every entry gets its own remote folder.
    """
    entries = [e.strip() for e in (text or "").split(",")]
    if not any(entries):
        raise NetbedError("--hosts is empty", hint="e.g. --hosts user@h1,user@h2:2222")
    out: list[HostSpec] = []
    for pos, entry in enumerate(entries, 1):
        m = _HOST_RE.match(entry)
        if not entry or not m:
            raise NetbedError(
                f"--hosts entry {pos} {entry!r} is not [user@]host[:port]",
                hint="separate hosts with commas, no spaces inside an entry; "
                     "IPv6 goes in brackets: user@[::1]:2222")
        port = int(m["port"]) if m["port"] else None
        if port is not None and not 1 <= port <= 65535:
            raise NetbedError(f"--hosts entry {pos} {entry!r}: port {port} is out of range",
                              hint="use a TCP port between 1 and 65535")
        out.append(HostSpec(m["v6"] or m["host"], m["user"], port))
    return out


@dataclass(frozen=True)
class Assignment:
    """Host number `index` (1-based) of `total` runs shard index/total."""

    host: HostSpec
    index: int
    total: int

    @property
    def shard(self) -> str:
        return f"{self.index}/{self.total}"

    @property
    def label(self) -> str:
        """A folder-safe, unique name: '<k>-<host>[-<port>]'."""
        port = f"-{self.host.port}" if self.host.port else ""
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.index}-{self.host.host}{port}")


def assign_shards(hosts: list[HostSpec]) -> list[Assignment]:
    """Host i of N gets shard i/N: `testbed.experiment.matrix.shard` makes them a partition."""
    return [Assignment(h, i, len(hosts)) for i, h in enumerate(hosts, 1)]


@dataclass(frozen=True)
class RemoteOptions:
    """How to reach and prepare the hosts (all but the hosts themselves)."""

    remote_root: str = "netbed-runs"  # relative to the login's home, or absolute
    netbed_path: str | None = None  # netbed already checked out (and installed) here
    install: bool = True  # pip install -e the shipped checkout into a venv
    python: str = "python3"  # interpreter on the host (the venv is made from it)
    key_filename: str | None = None  # else ssh agent / ~/.ssh/config / default keys
    cache_dir: str | None = None  # INVOKE_NETBED_CACHE_DIR on the hosts (share a cache)
    parallel: int | None = None  # hosts at once (None: all)
    connect_timeout: float = 30.0

    def connect_kwargs(self) -> dict[str, object]:
        """Fabric `connect_kwargs`: an explicit key is used alone, never mixed with others.

        (The connect timeout goes to Connection(connect_timeout=...): Fabric refuses both.)
        """
        kw: dict[str, object] = {}
        if self.key_filename:
            kw.update(key_filename=str(Path(self.key_filename).expanduser()),
                      look_for_keys=False)
        return kw


@dataclass(frozen=True)
class RemotePlan:
    """Absolute remote paths and the shell commands for one assignment (pure)."""

    workdir: str  # absolute, per assignment
    shard: str
    config_name: str
    options: RemoteOptions
    commit: str | None = None  # what was shipped (None when netbed_path is used)

    @property
    def src(self) -> str:
        return self.options.netbed_path or f"{self.workdir}/src"

    @property
    def results(self) -> str:
        return f"{self.workdir}/results"

    @property
    def config(self) -> str:
        return f"{self.workdir}/config/{self.config_name}"

    @property
    def python(self) -> str:
        if self.options.netbed_path is None and self.options.install:
            return f"{self.workdir}/venv/bin/python"
        return self.options.python

    def unpack_command(self) -> str:
        """Clone the shipped bundle and check out exactly the shipped commit."""
        q = shlex.quote
        commit = self.commit or "HEAD"
        return (f"command -v git >/dev/null || {{ echo 'git is not installed' >&2; exit 127; }}"
                f" && rm -rf {q(self.src)}"
                f" && git clone -q {q(f'{self.workdir}/{BUNDLE_NAME}')} {q(self.src)}"
                f" && git -C {q(self.src)} -c advice.detachedHead=false checkout -q {q(commit)}")

    def install_command(self) -> str | None:
        """A venv that sees the host's packages (no re-download of pandas & co.) + netbed."""
        if self.options.netbed_path is not None or not self.options.install:
            return None
        q = shlex.quote
        venv = f"{self.workdir}/venv"
        return (f"{q(self.options.python)} -m venv --system-site-packages {q(venv)}"
                f" && {q(venv + '/bin/python')} -m pip install -q"
                f" --disable-pip-version-check -e {q(self.src)}")

    def env(self) -> dict[str, str]:
        env = {"INVOKE_NETBED_RESULTS_DIR": self.results, "PYTHONUNBUFFERED": "1"}
        if self.options.cache_dir:
            env["INVOKE_NETBED_CACHE_DIR"] = self.options.cache_dir
        return env

    def run_command(self) -> str:
        """The shard's run, its pid recorded so an interrupt can reach it (exec keeps it)."""
        q = shlex.quote
        env = " ".join(f"{k}={q(v)}" for k, v in sorted(self.env().items()))
        return (f"cd {q(self.src)} && echo $$ > {q(f'{self.workdir}/{PID_FILE}')}"
                f" && exec env {env} {q(self.python)} -m invoke run-matrix"
                f" --config {q(self.config)} --shard {self.shard} --no-report")

    def interrupt_command(self) -> str:
        pid = shlex.quote(f"{self.workdir}/{PID_FILE}")
        return f"test -f {pid} && kill -INT \"$(cat {pid})\" 2>/dev/null || true"

    def pack_command(self) -> str:
        """Tar the shard's run folder(s), without scratch space, for one SFTP get."""
        q = shlex.quote
        return (f"cd {q(self.results)} && tar -czf {q(f'{self.workdir}/{PACK_NAME}')}"
                f" --exclude='./*/{WORK_DIR}' .")


class LinePrefixer:
    """A file-like sink for a remote stream: complete lines go to `log` with a prefix.

    Fabric hands over arbitrary chunks; buffering to whole lines keeps several
    hosts' output readable when it interleaves.
    """

    def __init__(self, prefix: str, log: Log) -> None:
        self.prefix = prefix
        self.log = log
        self._buf = ""
        self._lock = threading.Lock()

    def write(self, chunk: str) -> int:
        with self._lock:
            self._buf += chunk.replace("\r\n", "\n").replace("\r", "\n")
            *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line.strip():
                self.log(f"[{self.prefix}] {line}")
        return len(chunk)

    def flush(self) -> None:
        with self._lock:
            rest, self._buf = self._buf, ""
        if rest.strip():
            self.log(f"[{self.prefix}] {rest}")


# --------------------------------------------------------------------------- outcomes


@dataclass
class HostOutcome:
    assignment: Assignment
    exit_code: int | None = None  # the remote run-matrix's status; None if it never ran
    run_dirs: list[Path] = field(default_factory=list)  # pulled run folders
    error: str | None = None  # why the host failed (connection, shipping, pulling)

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0 and bool(self.run_dirs)

    def describe(self) -> str:
        where = f"{self.assignment.host} (shard {self.assignment.shard})"
        if self.error:
            return f"{where}: FAILED: {self.error}"
        if self.exit_code != 0:
            return (f"{where}: run-matrix exited {self.exit_code} (some repetitions failed); "
                    f"pulled {len(self.run_dirs)} run folder(s)")
        return f"{where}: ok"


@dataclass
class HostsSummary:
    pulled_to: Path
    outcomes: list[HostOutcome]
    merged: Path | None = None
    merge_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes) and self.merged is not None

    def text(self) -> str:
        lines = [o.describe() for o in self.outcomes]
        if self.merged:
            lines.append(f"merged: {self.merged}")
        if self.merge_error:
            lines.append(f"merge FAILED: {self.merge_error}")
        lines.append(f"shard folders: {self.pulled_to}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- effects


def _git(*args: str) -> str:
    proc = HostShell(cwd=REPO_ROOT).run(["git", *args], check=False)
    if not proc.ok:
        raise NetbedError(f"git {' '.join(args)} failed: {proc.stderr.strip()}",
                          hint="--hosts ships the checkout's commit: run it from a git checkout"
                               " or pass --netbed PATH")
    return proc.stdout.strip()


def make_bundle(dest: Path, log: Log) -> str:
    """A git bundle of HEAD (what the hosts will run); returns the commit id."""
    commit = _git("rev-parse", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no"):
        log(f"note: shipping commit {commit[:12]}; uncommitted changes are NOT shipped")
    _git("bundle", "create", "-q", str(dest), "HEAD")
    return commit


@dataclass(frozen=True)
class ConfigFiles:
    """The experiment file and the files it references, as (local, name under config/)."""

    name: str
    files: tuple[tuple[Path, str], ...]


def config_files(config: Path) -> ConfigFiles:
    """Validate the experiment locally (fail before touching any host) and list its files."""
    exp = load_experiment(config)
    files: list[tuple[Path, str]] = [(config, config.name)]
    if exp.policies_file:
        rel = PurePosixPath(exp.policies_file)
        if rel.is_absolute() or ".." in rel.parts:
            raise NetbedError(f"{config}: policies_file {exp.policies_file!r} must be a path "
                              "below the experiment file's folder to be shipped to hosts",
                              hint="put the policies file next to the experiment file")
        files.append((config.parent / exp.policies_file, str(rel)))
    if exp.kernels_file:
        files += _kernels_files(config, exp.kernels_file, exp.kernels)
    return ConfigFiles(config.name, tuple(files))


def _kernels_files(config: Path, written: str, kernels: KernelSet) -> list[tuple[Path, str]]:
    """The kernels file and the patches and fragments it names that live below the
    experiment's folder (images/patches/ travels with the shipped commit)."""
    top = config.parent.resolve()
    rel = PurePosixPath(written)
    if rel.is_absolute() or ".." in rel.parts:
        raise NetbedError(f"{config}: kernels_file {written!r} must be a path below the "
                          "experiment file's folder to be shipped to hosts",
                          hint="put the kernels file next to the experiment file")
    out = [(config.parent / written, str(rel))]
    for v in kernels.variants.values():
        if v.base.path is not None:
            raise NetbedError(f"{v.where}: kernel {v.name}: a local base ({v.base.name}) is "
                              "not shipped to hosts", hint="use a Debian base for remote runs")
        for path in [*(ref.path for ref in v.patches), *([v.config] if v.config else [])]:
            resolved = path.resolve()
            if resolved.is_relative_to(PATCHES_DIR.resolve()):
                continue
            if not resolved.is_relative_to(top):
                raise NetbedError(f"{v.where}: kernel {v.name}: {path} is outside the "
                                  "experiment file's folder and cannot be shipped to hosts",
                                  hint="put it next to the experiment file, or commit it to "
                                       "images/patches/")
            out.append((resolved, str(resolved.relative_to(top))))
    return list(dict.fromkeys(out))


class HostJob:
    """Everything done on one host for one assignment, over one Fabric connection."""

    def __init__(self, assignment: Assignment, options: RemoteOptions, run_tag: str,
                 cfg: ConfigFiles, bundle: Path | None, commit: str | None, pulled_to: Path,
                 log: Log) -> None:
        self.a = assignment
        self.options = options
        self.run_tag = run_tag
        self.cfg = cfg
        self.bundle = bundle
        self.commit = commit
        self.pulled_to = pulled_to
        self.log = log
        self.plan: RemotePlan | None = None
        self.outcome = HostOutcome(assignment)

    def _connect(self) -> Connection:
        h = self.a.host
        return Connection(h.host, user=h.user, port=h.port,
                          connect_kwargs=self.options.connect_kwargs(),
                          connect_timeout=self.options.connect_timeout)

    def _say(self, msg: str) -> None:
        self.log(f"[{self.a.label}] {msg}")

    def _run(self, c: Connection, cmd: str, what: str, stream: bool = False) -> Result:
        """Run `cmd`; a failure raises NetbedError naming the step and the output."""
        kw: dict[str, object] = {"hide": True, "warn": True, "in_stream": False}
        out = LinePrefixer(self.a.label, self.log)
        if stream:
            kw.update(out_stream=out, err_stream=out)
        res: Result = c.run(cmd, **kw)
        if stream:
            out.flush()
        if res.exited != 0 and not stream:
            tail = (res.stdout + res.stderr).strip()[-600:]
            raise NetbedError(f"{what} failed on {self.a.host} (exit {res.exited}): {tail}")
        return res

    def __call__(self) -> HostOutcome:
        try:
            with contextlib.closing(self._connect()) as c:
                self._work(c)
        except Exception as exc:  # a host's failure must not stop the others
            self.outcome.error = f"{type(exc).__name__}: {str(exc).strip()[:600]}"
            self._say(f"FAILED: {self.outcome.error}")
        return self.outcome

    def _work(self, c: Connection) -> None:
        q = shlex.quote
        root = self.options.remote_root.rstrip("/") or "/"
        wd = f"{root}/{self.run_tag}/{self.a.label}"
        workdir = self._run(c, f"mkdir -p {q(wd)}/config && cd {q(wd)} && pwd",
                            "creating the run folder").stdout.strip()
        self.plan = plan = RemotePlan(workdir, self.a.shard, self.cfg.name, self.options,
                                      self.commit)
        self._say(f"folder {workdir}")
        for local, rel in self.cfg.files:
            target = f"{workdir}/config/{rel}"
            if "/" in rel:
                self._run(c, f"mkdir -p {q(str(PurePosixPath(target).parent))}", "mkdir")
            c.put(str(local), target)
        if self.bundle is not None:
            c.put(str(self.bundle), f"{workdir}/{BUNDLE_NAME}")
            self._run(c, plan.unpack_command(), "unpacking the shipped commit")
            self._say(f"shipped commit {(self.commit or '?')[:12]}")
        else:
            head = self._run(c, f"git -C {q(plan.src)} rev-parse HEAD 2>/dev/null || true",
                             "reading the remote commit").stdout.strip()
            self._say(f"using netbed at {plan.src} (commit {head[:12] or 'unknown'})")
        install = plan.install_command()
        if install:
            self._say("installing netbed into a venv (system packages visible)")
            self._run(c, install, "pip install")
        self._say(f"running shard {plan.shard}")
        res = self._run(c, plan.run_command(), "run-matrix", stream=True)
        self.outcome.exit_code = res.exited
        self._pull(c, plan)

    def _pull(self, c: Connection, plan: RemotePlan) -> None:
        if c.run(f"test -d {shlex.quote(plan.results)}", hide=True, warn=True,
                 in_stream=False).exited != 0:
            raise NetbedError(f"run-matrix exited {self.outcome.exit_code} without a run folder"
                              " (its output is above)")
        self._run(c, plan.pack_command(), "packing the results")
        dest = self.pulled_to / self.a.label
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="netbed-pull-") as tmp:
            local = Path(tmp) / PACK_NAME
            c.get(f"{plan.workdir}/{PACK_NAME}", str(local))
            with tarfile.open(local) as tar:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse odd members
                    tar.extractall(dest, filter="data")
                else:  # pragma: no cover - our own tarball, made by pack_command
                    tar.extractall(dest)
        self.outcome.run_dirs = sorted(p for p in dest.iterdir()
                                       if (p / "experiment.yaml").is_file())
        self._say(f"pulled {len(self.outcome.run_dirs)} run folder(s) into {dest}")

    def interrupt(self) -> None:
        """Ask the remote run-matrix to stop cleanly (SIGINT: guests torn down)."""
        if self.plan is None or self.outcome.exit_code is not None:
            return
        with contextlib.suppress(Exception), contextlib.closing(self._connect()) as c:
            c.run(self.plan.interrupt_command(), hide=True, warn=True, in_stream=False)


@contextlib.contextmanager
def _shipment(options: RemoteOptions, log: Log) -> Iterator[tuple[Path | None, str | None]]:
    if options.netbed_path is not None:
        yield None, None
        return
    with tempfile.TemporaryDirectory(prefix="netbed-ship-") as tmp:
        bundle = Path(tmp) / BUNDLE_NAME
        commit = make_bundle(bundle, log)
        yield bundle, commit


def run_on_hosts(settings: Settings, config: Path, hosts: list[HostSpec],
                 options: RemoteOptions, log: Log = print) -> HostsSummary:
    """Run `config` sharded over `hosts`, pull the shards back and merge what exists."""

    cfg = config_files(config)
    tag = new_run_id(load_experiment(config).name)
    pulled_to = settings.results_dir / f"{tag}-hosts"
    assignments = assign_shards(hosts)
    log(f"{len(hosts)} host(s): " + ", ".join(f"{a.host} -> shard {a.shard}"
                                             for a in assignments))
    with _shipment(options, log) as (bundle, commit):
        jobs = [HostJob(a, options, tag, cfg, bundle, commit, pulled_to, log)
                for a in assignments]
        workers = max(1, min(options.parallel or len(jobs), len(jobs)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="netbed-host") as pool:
            futures = [pool.submit(job) for job in jobs]
            try:
                outcomes = [f.result() for f in futures]
            except KeyboardInterrupt:
                log("interrupted: asking the hosts' runs to stop")
                for f in futures:
                    f.cancel()
                for job in jobs:
                    job.interrupt()
                raise
    summary = HostsSummary(pulled_to, outcomes)
    runs = [d for o in outcomes for d in o.run_dirs]
    if runs:
        try:
            summary.merged = merge_runs(runs, settings.results_dir / f"{tag}-merged",
                                        settings.results_dir)
        except NetbedError as exc:
            summary.merge_error = str(exc)
    else:
        summary.merge_error = "no host produced a run folder"
    return summary
