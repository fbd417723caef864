"""A real single-node SLURM cluster in a temporary folder, for integration tests.

``SlurmCluster`` writes its own ``slurm.conf`` (free ports, its own state,
spool, logs and pid files), starts a private ``munged`` on its own socket with
its own key, then ``slurmctld`` and ``slurmd`` in the foreground, so every
daemon is a child process whose PID we hold. ``stop()`` cancels the
cluster's jobs and stops each daemon by that PID, never by name. Nothing
outside the temporary folder is touched: a system munged or slurm keeps
running undisturbed, and two clusters can run side by side.

``ensure_slurm()`` returns None when the binaries are there (installing
Debian's ``slurm-wlm`` and ``munge`` once with apt-get when running as root),
or the reason why a cluster cannot be started here.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
_install_tried = False


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def ensure_slurm() -> str | None:
    """None when a cluster can be started here, else the reason it cannot."""
    global _install_tried
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM needs a POSIX system"
    if os.geteuid() != 0:
        return "starting slurmd needs root (it runs jobs as their owner); run the tests as root"
    if _missing() and shutil.which("apt-get") and not _install_tried:
        _install_tried = True  # one attempt per test session; `make test` normally installed it already
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
        try:
            if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
                subprocess.run(cmd, env=env, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            pass
    missing = _missing()
    if missing:
        how = "apt-get install slurm-wlm munge failed" if shutil.which("apt-get") else "no apt-get here"
        return f"SLURM is not installed ({how}; missing: {', '.join(missing)})"
    return None


def _mem_total_mb() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One controller and one compute node (this machine), all state under ``root``."""

    def __init__(self, root: Path | None = None, cpus: int | None = None, real_memory_mb: int | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="ddm-slurm-"))
        # The munge user must be able to reach its own folder below this one.
        self.root.chmod(0o755)
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        self.cpus = cpus or os.cpu_count() or 1
        # Declaring more memory than slurmd finds would drain the node: stay below what is there.
        self.real_memory_mb = real_memory_mb or min(20000, int(0.9 * _mem_total_mb()))
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self._saved_env: str | None = None

    # -- configuration
    def _write_conf(self) -> None:
        d = self.root
        for sub in ("state", "spool"):
            (d / sub).mkdir(exist_ok=True)
        (d / "plugstack.conf").write_text("")  # keeps the system's spank plugins out
        self.conf.write_text(f"""\
ClusterName=ddmtest
# Addresses given outright: the host name need not resolve.
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={self.socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default each task would claim the node's whole memory and tasks would run one at a time.
DefMemPerCPU=1000
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.log
MpiDefault=none
ReturnToService=2
SwitchType=switch/none
MailProg=/bin/true
PlugStackConfig={d}/plugstack.conf
# A cancelled job is killed 5 s after its SIGTERM (default 30); finished jobs stay visible to scontrol 10 min.
KillWait=5
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munged(self) -> None:
        """A private munged: own key, socket, pid, log and seed files, running as the munge user."""
        self.munge_dir.mkdir(exist_ok=True)
        self.munge_dir.chmod(0o711)  # munged wants its socket folder searchable by every client
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        try:
            user = pwd.getpwnam("munge")
            for p in (self.munge_dir, key):
                os.chown(p, user.pw_uid, user.pw_gid)
            as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        except KeyError:  # no munge account: run it as ourselves
            as_user = {}
        m = self.munge_dir
        cmd = [
            _which("munged"),
            "--foreground",
            f"--socket={self.socket}",
            f"--key-file={key}",
            f"--pid-file={m}/munged.pid",
            f"--log-file={m}/munged.log",
            f"--seed-file={m}/munged.seed",
        ]
        self._spawn("munged", cmd, **as_user)
        self._wait(lambda: self.socket.exists(), 20, "munged did not create its socket")

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        out = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
        )
        out.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}: {self.logs(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout:.0f}s: {self.logs()}")

    # -- life cycle
    def start(self) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; return once the node is idle. SLURM_CONF is set for children."""
        self._write_conf()
        self._saved_env = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        try:
            self._start_munged()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
            self._wait(
                lambda: self.command(["scontrol", "ping"]).stdout.count("UP") >= 1, 60, "slurmctld did not answer"
            )
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
            self._wait(lambda: self.node_state().startswith("idle"), 60, "the node did not become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop slurmd, slurmctld and munged, each by its PID."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # Again and again: a job may answer SIGTERM by requeueing itself, and then it must be cancelled
            # while pending. Once the queue is empty no job step (slurmstepd) outlives slurmd.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                jobs = sorted(set(self.command(["squeue", "-h", "-o", "%A"]).stdout.split()))
                if not jobs:
                    break
                self.command(["scancel", *jobs])
                time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if self._saved_env is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._saved_env

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- queries
    def command(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; never raises (rc 124 on a timeout)."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(cmd, 124, e.stdout or "", e.stderr or "")

    def node_state(self) -> str:
        return self.command(["sinfo", "-h", "-N", "-o", "%T"]).stdout.strip()

    def queue(self) -> list[str]:
        """Lines ``jobid|name|state`` of every job the controller still lists as queued or running."""
        return self.command(["squeue", "-h", "-r", "-o", "%i|%j|%T"]).stdout.split()

    def logs(self, *names: str) -> str:
        """The tail of each daemon's log, for error messages."""
        files = (
            [self.root / f"{n}.log" for n in ("slurmctld", "slurmd")]
            + [self.munge_dir / "munged.log"]
            + [self.root / f"{n}.stdout" for n in ("munged", "slurmctld", "slurmd")]
        )
        if names:
            files = [f for f in files if any(n in f.name for n in names)]
        out = []
        for f in files:
            if f.exists():
                out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)


def running_cluster() -> Iterator[SlurmCluster]:
    """A started test cluster for a fixture to yield from: skips the test where SLURM cannot run here, fails it
    where SLURM is installed but the cluster does not start, and stops the cluster (all its daemons) after."""
    import pytest

    reason = ensure_slurm()
    if reason:
        print(f"\nSLURM integration tests skipped: {reason}", file=sys.stderr)
        pytest.skip(f"SLURM integration tests skipped: {reason}")
    c = SlurmCluster()
    try:
        c.start()
    except RuntimeError as e:
        shutil.rmtree(c.root, ignore_errors=True)
        pytest.fail(f"SLURM is installed but the test cluster did not start: {e}")
    try:
        yield c
    finally:
        c.stop()
        assert all(p.poll() is not None for p in c.procs.values())
        shutil.rmtree(c.root, ignore_errors=True)
