"""A throw-away single-node SLURM cluster on localhost, for the SLURM integration test.

``SlurmCluster`` (a context manager; needs root, no systemd) writes ``/etc/slurm/slurm.conf`` and
``/etc/slurm/gres.conf`` (backing up and afterwards restoring whatever was there: the config has
to live there because the slurm executor's job step strips ``SLURM_*`` variables, so
``SLURM_CONF`` would not reach the inner ``srun``), starts munged if no working munged is
running, starts slurmctld and slurmd in the foreground as child processes, waits until the node
is idle, and on exit stops exactly the processes it started, by pid.

The daemons listen on free ports, so a cluster already running on the default ports is not
disturbed; a lock file serialises concurrent ``SlurmCluster`` instances (they share the config
path). ``run_snakemake`` runs a workflow with ``--executor slurm`` and returns what SLURM saw.

Command line (a demo): ``python tests/slurm/cluster.py -- snakemake --profile profiles/slurm``
starts the cluster, runs the command in it, stops the cluster and exits with the command's code.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INSTALL_SCRIPT = REPO / ".ci" / "install-slurm.sh"
CONF_DIR = Path("/etc/slurm")
LOCK_FILE = Path("/run/lock/qatforge-slurm-test.lock")
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGED = "/usr/sbin/munged"
MIN_CPUS = 2
MIN_MEMORY_MB = 32768
REQUIRED_BINARIES = (
    "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel",
    "munge", "unmunge",
)
SUBMITTED_RE = re.compile(
    r"Job (?P<job>\d+) has been submitted with SLURM jobid (?P<slurm>\d+) \(log: (?P<log>[^)]*)\)"
)
RUN_ID_RE = re.compile(r"SLURM run ID: (\S+)")


def missing_binaries() -> list[str]:
    """Names of the SLURM/munge programs that are not installed."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if not Path(MUNGED).exists():
        missing.append(MUNGED)
    return missing


def ensure_installed(timeout: float = 900) -> str | None:
    """Install the Debian packages via ``.ci/install-slurm.sh`` if needed.

    Returns ``None`` when everything is available, else the reason why it is not (for a skip).
    """
    if not missing_binaries():
        return None
    if not INSTALL_SCRIPT.exists():
        return f"SLURM is not installed and {INSTALL_SCRIPT} is missing"
    try:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"{INSTALL_SCRIPT} did not finish within {timeout:.0f} s"
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return f"SLURM cannot be installed here ({INSTALL_SCRIPT} exit {proc.returncode}): " + " | ".join(tail)
    still = missing_binaries()
    if still:
        return f"{INSTALL_SCRIPT} succeeded but these are still missing: {', '.join(still)}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> dict[str, int]:
    """CPUs and RealMemory (MB) as ``slurmd -C`` reports them for this machine."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    found = dict(re.findall(r"\b(CPUs|RealMemory)=(\d+)", out))
    if "CPUs" not in found or "RealMemory" not in found:
        raise RuntimeError(f"cannot parse `slurmd -C` output: {out!r}")
    return {k: int(v) for k, v in found.items()}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"<{path} unreadable>"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _munge_works(env: dict[str, str] | None = None) -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, env=env)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10, env=env)
        return dec.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def parse_scontrol_oneliner(line: str) -> dict[str, str]:
    """Parse one ``scontrol show job -o`` line into ``{key: value}``."""
    return dict(re.findall(r"(\S+?)=(\S*)", line))


@dataclass
class SlurmRun:
    """What one ``snakemake --executor slurm`` run did, as seen by snakemake and by SLURM."""

    returncode: int
    seconds: float
    log: str
    run_id: str | None
    submitted: dict[int, int]          # snakemake job id -> SLURM job id
    slurm_jobs: dict[int, dict[str, str]]  # SLURM job id -> `scontrol show job` fields

    def rule_of(self, slurm_id: int) -> str:
        """Rule name of a SLURM job, from the comment the plugin attaches (``rule_<name>...``)."""
        comment = self.slurm_jobs.get(slurm_id, {}).get("Comment", "")
        m = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment)
        return m.group(1) if m else ""


@dataclass
class SlurmCluster:
    """Single-node SLURM cluster on localhost; use as ``with SlurmCluster() as cluster: ...``."""

    partition: str = "qatforge"
    # Node size declared to SLURM (slurmd runs with config_overrides, so it may exceed the
    # hardware; memory is only a scheduling label here: task/none enforces nothing). Defaults:
    # what `slurmd -C` reports, but at least MIN_CPUS / MIN_MEMORY_MB so that the profile's
    # per-rule requests fit on small CI machines.
    cpus: int | None = None
    real_memory_mb: int | None = None
    def_mem_per_cpu_mb: int = 1000
    startup_timeout: float = 60.0
    lock_timeout: float = 1800.0
    keep_state: bool = False            # keep the state dir (logs) after a clean stop
    state_dir: Path | None = field(default=None, init=False)
    startup_seconds: float | None = field(default=None, init=False)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, init=False, repr=False)
    _munged_pid: int | None = field(default=None, init=False, repr=False)
    _backups: dict[Path, Path | None] = field(default_factory=dict, init=False, repr=False)
    _lock_fd: int | None = field(default=None, init=False, repr=False)
    _prev_sigterm: object = field(default=None, init=False, repr=False)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(keep_state=self.keep_state or exc_type is not None)

    def start(self) -> None:
        """Write the config, start munged (if needed), slurmctld and slurmd; wait for an idle node."""
        if os.geteuid() != 0:
            raise PermissionError("SlurmCluster must run as root (it writes /etc/slurm and starts daemons)")
        missing = missing_binaries()
        if missing:
            raise FileNotFoundError(f"SLURM/munge programs not installed: {', '.join(missing)}")
        t0 = time.monotonic()
        self._acquire_lock()
        self._trap_sigterm()
        try:
            hw = _node_hardware()
            self.cpus = self.cpus or max(hw["CPUs"], MIN_CPUS)
            self.real_memory_mb = self.real_memory_mb or max(hw["RealMemory"], MIN_MEMORY_MB)
            self.state_dir = Path(tempfile.mkdtemp(prefix="qatforge-slurm-"))
            for sub in ("ctld", "slurmd", "backup"):
                (self.state_dir / sub).mkdir()
            self._write_config()
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D"])
            self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost"])
            self._wait_idle()
        except BaseException:
            self.stop(keep_state=True)
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self, keep_state: bool = False) -> None:
        """Cancel leftover jobs, stop the daemons this instance started (by pid), restore config."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._cancel_all_jobs()
        for name in ("slurmd", "slurmctld"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                self._terminate_child(proc)
        if self._munged_pid is not None:
            self._terminate_pid(self._munged_pid, expected_name="munged")
            self._munged_pid = None
        self._restore_config()
        if self.state_dir is not None:
            if keep_state:
                print(f"SlurmCluster: logs and state kept in {self.state_dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.state_dir, ignore_errors=True)
        self._release_lock()
        self._untrap_sigterm()

    # -- public helpers --------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return CONF_DIR / "slurm.conf"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for SLURM clients: no inherited ``SLURM_*``/``SBATCH_*``, config in /etc/slurm."""
        env = dict(os.environ if base is None else base)
        for key in list(env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_")):
                del env[key]
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def jobs(self) -> dict[int, dict[str, str]]:
        """All jobs slurmctld still knows (finished ones for ``MinJobAge`` = 300 s), by job id."""
        out = self.run("scontrol", "show", "job", "-o", check=False)
        jobs = {}
        for line in out.splitlines():
            fields = parse_scontrol_oneliner(line)
            if fields.get("JobId", "").isdigit():
                jobs[int(fields["JobId"])] = fields
        return jobs

    def controller_log(self) -> str:
        assert self.state_dir is not None, "cluster not started"
        return (self.state_dir / "slurmctld.log").read_text(errors="replace")

    def run_snakemake(
        self,
        workdir: Path,
        args: Sequence[str],
        timeout: float,
        snakemake: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> SlurmRun:
        """Run ``snakemake <args>`` in ``workdir`` under ``timeout -k`` and collect job ids."""
        exe = snakemake or str(Path(sys.executable).with_name("snakemake"))
        env = self.env()
        env.update(extra_env or {})
        cmd = ["timeout", "-k", "15", str(int(timeout)), exe, *args]
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        seconds = time.monotonic() - t0
        log = proc.stdout
        submitted = {int(m["job"]): int(m["slurm"]) for m in SUBMITTED_RE.finditer(log)}
        run_id = next(iter(RUN_ID_RE.findall(log)), None)
        known = self.jobs()
        slurm_jobs = {sid: known.get(sid, {}) for sid in submitted.values()}
        return SlurmRun(proc.returncode, seconds, log, run_id, submitted, slurm_jobs)

    # -- internals -------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"another SlurmCluster holds {LOCK_FILE} for > {self.lock_timeout:.0f} s")
                time.sleep(1)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _trap_sigterm(self) -> None:
        """Turn SIGTERM (e.g. from `timeout` around pytest) into SystemExit so that stop() runs."""
        import threading

        if threading.current_thread() is not threading.main_thread() or self._prev_sigterm is not None:
            return

        def _exit(signum, frame):
            raise SystemExit(128 + signum)

        self._prev_sigterm = signal.signal(signal.SIGTERM, _exit)

    def _untrap_sigterm(self) -> None:
        if self._prev_sigterm is not None:
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None

    def _write_config(self) -> None:
        assert self.state_dir is not None
        template = string.Template((HERE / "slurm.conf.in").read_text())
        conf = template.substitute(
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            def_mem_per_cpu=self.def_mem_per_cpu_mb,
            state_dir=self.state_dir,
            cpus=self.cpus,
            real_memory=self.real_memory_mb,
            partition=self.partition,
        )
        CONF_DIR.mkdir(parents=True, exist_ok=True)
        for name, text in (("slurm.conf", conf), ("gres.conf", (HERE / "gres.conf").read_text())):
            target = CONF_DIR / name
            if target not in self._backups:
                if target.exists() or target.is_symlink():
                    backup = self.state_dir / "backup" / name
                    shutil.move(str(target), backup)
                    self._backups[target] = backup
                else:
                    self._backups[target] = None
            target.write_text(text)
            target.chmod(0o644)

    def _restore_config(self) -> None:
        for target, backup in self._backups.items():
            target.unlink(missing_ok=True)
            if backup is not None:
                shutil.move(str(backup), target)
        self._backups.clear()

    def _start_munged(self) -> None:
        if _munge_works():
            return  # a working munged (system or another user's) is reused, never stopped
        import pwd

        munge = pwd.getpwnam("munge")
        for d, mode in ((MUNGE_RUN_DIR, 0o755), (Path("/var/log/munge"), 0o700), (Path("/var/lib/munge"), 0o711)):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, munge.pw_uid, munge.pw_gid)
            d.chmod(mode)
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)], check=True, timeout=30)
            os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
            MUNGE_KEY.chmod(0o400)
        pidfile = MUNGE_RUN_DIR / "munged.pid"
        pidfile.unlink(missing_ok=True)
        proc = subprocess.run(
            ["runuser", "-u", "munge", "--", MUNGED], capture_output=True, text=True, timeout=30
        )
        if proc.returncode != 0:
            raise RuntimeError(f"munged failed to start: {proc.stderr.strip() or proc.stdout.strip()}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if pidfile.exists() and pidfile.read_text().strip().isdigit():
                pid = int(pidfile.read_text().strip())
                if _proc_name(pid) == "munged":
                    self._munged_pid = pid
                    if _munge_works():
                        return
            time.sleep(0.1)
        raise RuntimeError(f"munged did not come up (pidfile {pidfile}); see /var/log/munge/munged.log")

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.state_dir is not None
        out = open(self.state_dir / f"{name}.out", "wb")
        try:
            self._procs[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env(), start_new_session=True,
            )
        finally:
            out.close()

    def _wait_idle(self) -> None:
        assert self.state_dir is not None
        deadline = time.monotonic() + self.startup_timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} during start-up:\n"
                        f"{_tail(self.state_dir / f'{name}.out')}\n{_tail(self.state_dir / f'{name}.log')}"
                    )
            res = subprocess.run(
                ["sinfo", "-h", "-N", "-n", "localhost", "-o", "%t"],
                capture_output=True, text=True, timeout=10, env=self.env(),
            )
            state = res.stdout.strip()
            if res.returncode == 0 and state == "idle":
                return
            time.sleep(0.25)
        raise RuntimeError(
            f"SLURM node not idle after {self.startup_timeout:.0f} s (state {state!r}):\n"
            f"{_tail(self.state_dir / 'slurmctld.log')}\n{_tail(self.state_dir / 'slurmd.log')}"
        )

    def _cancel_all_jobs(self) -> None:
        """Cancel jobs still pending/running on this private cluster and wait for them to end."""
        active = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING"
        try:
            ids = self.run("squeue", "-h", "-t", active, "-o", "%i", check=False).split()
            if ids:
                self.run("scancel", *ids, check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run("squeue", "-h", "-t", active, "-o", "%i", check=False).split():
                    time.sleep(0.5)
        except (OSError, subprocess.TimeoutExpired):
            pass

    @staticmethod
    def _terminate_child(proc: subprocess.Popen, grace: float = 15) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace)

    @staticmethod
    def _terminate_pid(pid: int, expected_name: str, grace: float = 10) -> None:
        if _proc_name(pid) != expected_name:
            return  # already gone (or the pid was reused): do not touch it
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _pid_alive(pid) and _proc_name(pid) == expected_name:
            time.sleep(0.1)
        if _pid_alive(pid) and _proc_name(pid) == expected_name:
            os.kill(pid, signal.SIGKILL)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python tests/slurm/cluster.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    reason = ensure_installed()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    with SlurmCluster() as cluster:
        print(f"SLURM cluster up in {cluster.startup_seconds:.1f} s (partition {cluster.partition})", file=sys.stderr)
        return subprocess.run(argv, env=cluster.env()).returncode


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
