"""A real single-node SLURM cluster on this machine, for the `slurm` tests (and by hand).

    python tests/sweeps/slurm_cluster.py start   # prints `export SLURM_CONF=...`
    python tests/sweeps/slurm_cluster.py stop

Why a real one: submitit talks to sbatch/squeue/sacct/scontrol, and requeue-after-preemption only means
something against the real scheduler. Everything lives in one state directory (config, spool, logs, a
private MariaDB for accounting) and every daemon is ended through its PID file; nothing in /etc changes.
Without accounting, submitit can wait forever on a job that died before writing its result, so
slurmdbd + MariaDB are part of the cluster. Settings below are the ones measured to matter here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
BINARIES = ["slurmctld", "slurmd", "slurmdbd", "sbatch", "munged", "mariadbd", "mysql_install_db"]
DEFAULT_DIR = Path(os.environ.get("RANKBENCH_SLURM_DIR", "/tmp/rankbench-slurm"))
CLUSTER = "rankbench"
PARTITION = "debug"
MUNGE_SOCKET = "/run/munge/munge.socket.2"
PORTS = {"slurmctld": 16817, "slurmd": 16818, "slurmdbd": 16819, "mysql": 13306}


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip with it)."""


@dataclass
class Cluster:
    """Paths of a cluster's state directory; `env` is what a client (sbatch, submitit) needs."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": _path()}

    def pidfile(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def log(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"


# --- installation ----------------------------------------------------------------------------------

def _path() -> str:
    """PATH with the sbin directories, where Debian puts the daemons (absent from some users' PATH)."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [p for p in ("/usr/sbin", "/sbin") if p not in parts])


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b, path=_path()) is None]


def ensure_installed(timeout: float = 900) -> None:
    """apt-get install the Debian SLURM packages when absent (CI is a fresh machine running as root)."""
    if not missing_binaries():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"SLURM is not installed ({', '.join(missing_binaries())} missing) and "
                                 "apt-get as root is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", *PACKAGES]
    if _run(install, env, timeout).returncode != 0:
        _run(["apt-get", "update", "-qq"], env, timeout)
        result = _run(install, env, timeout)
        if result.returncode != 0:
            raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: "
                                     f"{result.stderr.strip().splitlines()[-1:]}")
    if missing_binaries():
        raise ClusterUnavailable(f"after apt-get install, still missing: {', '.join(missing_binaries())}")


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60, check: bool = False,
         input: str | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PATH": _path()}
    result = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, input=input,
                            check=False)
    if check and result.returncode != 0:
        raise ClusterUnavailable(f"{' '.join(cmd)} failed ({result.returncode}): "
                                 f"{(result.stderr or result.stdout).strip()[-500:]}")
    return result


# --- configuration ---------------------------------------------------------------------------------

def _slurm_conf(c: Cluster, host: str, cpus: int, mem_mb: int) -> str:
    r = c.root
    return f"""\
ClusterName={CLUSTER}
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={PORTS['slurmctld']}
SlurmdPort={PORTS['slurmd']}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={c.pidfile('slurmctld')}
SlurmdPidFile={c.pidfile('slurmd')}
SlurmctldLogFile={c.log('slurmctld')}
SlurmdLogFile={c.log('slurmd')}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
EnforcePartLimits=ALL
SchedulerParameters=sched_interval=5,bf_interval=5
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=10
InactiveLimit=0
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={PORTS['slurmdbd']}
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _slurmdbd_conf(c: Cluster) -> str:
    return f"""\
AuthType=auth/munge
DbdHost=localhost
DbdPort={PORTS['slurmdbd']}
SlurmUser=root
PidFile={c.pidfile('slurmdbd')}
LogFile={c.log('slurmdbd')}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={PORTS['mysql']}
StorageUser=root
StorageLoc=slurm_acct_db
"""


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


# --- daemons ---------------------------------------------------------------------------------------

def start(root: Path = DEFAULT_DIR, timeout: float = 120) -> Cluster:
    """Install if needed, then start munged, MariaDB, slurmdbd, slurmctld and slurmd; wait for an idle
    node."""
    ensure_installed()
    c = Cluster(Path(root))
    stop(c.root)
    if c.root.exists():
        shutil.rmtree(c.root)
    for sub in ("run", "log", "state", "spool", "mysql"):
        (c.root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    mem_mb = max(1024, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20) - 1024)
    _write(c.conf, _slurm_conf(c, host, os.cpu_count() or 1, mem_mb))
    _write(c.root / "slurmdbd.conf", _slurmdbd_conf(c), 0o600)
    os.environ.update(SLURM_CONF=str(c.conf))  # for this process's clients (sbatch via submitit, sacctmgr)
    deadline = time.monotonic() + timeout
    _start_munge(c)
    _start_mysql(c, deadline)
    _start_daemon(c, "slurmdbd", ["slurmdbd"])  # reads slurmdbd.conf next to $SLURM_CONF
    _wait(lambda: _port_open(PORTS["slurmdbd"]), deadline, "slurmdbd to listen", c.log("slurmdbd"))
    _run(["sacctmgr", "-i", "add", "cluster", CLUSTER], c.env, 30)
    _start_daemon(c, "slurmctld", ["slurmctld", "-f", str(c.conf)])
    _start_daemon(c, "slurmd", ["slurmd", "-f", str(c.conf)])
    _wait(lambda: _node_state(c) == "idle", deadline, "the node to become idle", c.log("slurmctld"),
          alive=[c.pidfile("slurmctld"), c.pidfile("slurmd")])
    log.info("SLURM cluster up: export SLURM_CONF=%s", c.conf)
    return c


def _start_munge(c: Cluster) -> None:
    r = c.root
    if _munge_works():
        log.info("using the munged already running on %s", MUNGE_SOCKET)
        return
    # slurmctld's accounting connection ignores AuthInfo=socket=..., so munged must use the default socket
    Path(MUNGE_SOCKET).parent.mkdir(parents=True, exist_ok=True)
    cmd = ["munged", "--force", f"--pid-file={c.pidfile('munged')}", f"--log-file={c.log('munged')}",
           f"--seed-file={r}/run/munged.seed"]
    _run(cmd, timeout=30, check=True)
    _wait(_munge_works, time.monotonic() + 20, "munged", c.log("munged"))


def _munge_works() -> bool:
    if not Path(MUNGE_SOCKET).exists():
        return False
    cred = _run(["munge", "-n"], timeout=10)
    return cred.returncode == 0 and _run(["unmunge"], timeout=10, input=cred.stdout).returncode == 0


def _start_mysql(c: Cluster, deadline: float) -> None:
    data = c.root / "mysql"
    _run(["mysql_install_db", "--user=root", f"--datadir={data}", "--auth-root-authentication-method=normal",
          "--skip-test-db"], timeout=120, check=True)
    cmd = ["mariadbd", "--no-defaults", "--user=root", f"--datadir={data}", f"--port={PORTS['mysql']}",
           "--bind-address=127.0.0.1", f"--socket={c.root}/run/mysql.sock",
           f"--pid-file={c.pidfile('mysql')}", f"--log-error={c.log('mysql')}", "--skip-grant-tables",
           "--innodb-buffer-pool-size=64M"]
    with open(c.log("mysql").with_suffix(".out"), "w") as out:
        subprocess.Popen(cmd, env={**os.environ, "PATH": _path()}, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True)
    _wait(lambda: _port_open(PORTS["mysql"]), deadline, "MariaDB to listen", c.log("mysql"))


def _start_daemon(c: Cluster, name: str, cmd: list[str]) -> None:
    result = _run(cmd, c.env, 30)  # each daemonises and writes its PID file
    if result.returncode != 0:
        raise ClusterUnavailable(f"{name} did not start: {_tail(c.log(name))}")


def stop(root: Path = DEFAULT_DIR, timeout: float = 20) -> None:
    """End every daemon of the cluster by its PID file (never by name: other clusters may be running)."""
    c = Cluster(Path(root))
    _cancel_jobs(c)
    for daemon in ("slurmd", "slurmctld", "slurmdbd", "mysql", "munged"):
        pid = _read_pid(c.pidfile(daemon))
        if pid is None:
            continue
        _signal(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.2)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
        c.pidfile(daemon).unlink(missing_ok=True)


def _cancel_jobs(c: Cluster, timeout: float = 20) -> None:
    """Cancel what is still queued or running (job steps outlive slurmd), then wait for it to end."""
    pid = _read_pid(c.pidfile("slurmctld"))
    if pid is None or not _alive(pid) or not c.conf.exists():
        return
    jobs = _run(["squeue", "-h", "-o", "%A"], c.env, 10).stdout.split()
    if not jobs:
        return
    _run(["scancel", *sorted(set(jobs))], c.env, 10)
    end = time.monotonic() + timeout
    while time.monotonic() < end and _run(["squeue", "-h", "-o", "%A"], c.env, 10).stdout.strip():
        time.sleep(0.5)


# --- helpers ---------------------------------------------------------------------------------------

def _node_state(c: Cluster) -> str:
    result = _run(["sinfo", "-h", "-o", "%T"], c.env, 10)
    return result.stdout.strip().rstrip("*~#") if result.returncode == 0 else ""


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(ready, deadline: float, what: str, logfile: Path, alive: list[Path] = ()) -> None:
    """Poll `ready` until the deadline; give up early when a daemon that must be running has died."""
    while time.monotonic() < deadline:
        if ready():
            return
        dead = [p.stem for p in alive if (pid := _read_pid(p)) is None or not _alive(pid)]
        if dead:
            raise ClusterUnavailable(f"{', '.join(dead)} died while waiting for {what}; {logfile}: "
                                     f"{_tail(logfile)}")
        time.sleep(0.5)
    raise ClusterUnavailable(f"timed out waiting for {what}; {logfile}: {_tail(logfile)}")


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    action = sys.argv[1] if len(sys.argv) > 1 else "start"
    if action == "start":
        cluster = start()
        sys.stdout.write(f"export SLURM_CONF={cluster.conf}\n")
    elif action == "stop":
        stop()
    else:
        sys.exit(f"usage: {sys.argv[0]} start|stop")
