"""A real Slurm cluster on this machine for the tests: munge, MariaDB + slurmdbd (accounting, which
submitit needs to learn job states), slurmctld and two fake nodes (two slurmd -N), all under one folder,
on free ports, stopped again by their pid files (never by name). See ../shared/SLURM.md.

Debian's packages provide the daemons; `ensure_installed` installs them when missing (as root with
apt-get), and the tests skip with the reason when that is not possible.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged", "slurmdbd", "mariadbd", "mysql_install_db"]
NODES = ("node1", "node2")


def _missing() -> list[str]:
    return [b for b in BINARIES if not shutil.which(b) and not Path(f"/usr/sbin/{b}").exists()]


def ensure_installed() -> str | None:
    """None when the daemons are there (installing them if possible), else why not."""
    if not _missing():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"Slurm is not installed ({', '.join(_missing())} missing) and apt-get as root is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"could not install Slurm: {done.stderr.strip()[-300:]}"
    return None if not _missing() else f"still missing after install: {_missing()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}")


def _running(pid: int) -> bool:
    """Alive and not a zombie: a daemon that exited stays a zombie where this container's init does not reap
    its orphans, and waiting for a zombie to vanish took the full timeout for each daemon."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


class SlurmCluster:
    def __init__(self, base: Path):
        self.base = Path(base)
        self.host = socket.gethostname()
        self.ports = {k: _free_port() for k in ("ctld", "dbd", "mysql", *NODES)}
        self.pidfiles: list[Path] = []
        self.conf = self.base / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ----------------------------------------------------------------------------------- start, stop
    def start(self) -> "SlurmCluster":
        for d in ("etc", "munge", "state/ctld", "state/d", "run", "log", "mysql"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base / "munge", 0o755)  # munged refuses a socket folder others cannot traverse
        self._map_node_names()
        self._start_munge()
        self._start_mariadb()
        self._write_configs()
        self._start("slurmdbd", ["slurmdbd"], self.base / "run" / "slurmdbd.pid")
        _wait(lambda: self._port_open(self.ports["dbd"]), "slurmdbd")
        self.run("sacctmgr", "-i", "add", "cluster", "ci", check=False)
        self._start("slurmctld", ["slurmctld", "-c"], self.base / "run" / "slurmctld.pid")
        _wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld")
        for node in NODES:
            self._start(f"slurmd {node}", ["slurmd", "-N", node], self.base / "run" / f"slurmd-{node}.pid")
        _wait(lambda: all(s.strip() == "idle" for s in self.run("sinfo", "-h", "-N", "-o", "%t").stdout.split())
              and len(self.run("sinfo", "-h", "-N", "-o", "%t").stdout.split()) == len(NODES), "idle nodes", 90)
        return self

    def stop(self) -> None:
        """SIGTERM to every daemon at once, then SIGKILL to any still running after 15 s."""
        pids = []
        for pidfile in reversed(self.pidfiles):
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                continue
        deadline = time.time() + 15
        while time.time() < deadline and any(_running(p) for p in pids):
            time.sleep(0.2)
        for pid in filter(_running, pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --------------------------------------------------------------------------------------- pieces
    def _map_node_names(self) -> None:
        """The fake nodes are this machine: their names must resolve (ranks rendezvous at node1)."""
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        if not all(f" {n}" in text or f"\t{n}" in text for n in NODES):
            hosts.write_text(text.rstrip("\n") + "\n127.0.0.1 " + " ".join(NODES) + "  # qlora-dist test cluster\n")

    def _start(self, what: str, cmd: list[str], pidfile: Path) -> None:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{what} did not start: {done.stderr.strip()[-500:]}")
        _wait(pidfile.is_file, f"{what} pid file")
        self.pidfiles.append(pidfile)

    def _start_munge(self) -> None:
        key = self.base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.socket = self.base / "munge" / "munge.socket.2"
        pidfile = self.base / "run" / "munged.pid"
        self._start("munged", ["munged", "--force", f"--key-file={key}", f"--socket={self.socket}",
                               f"--pid-file={pidfile}", f"--log-file={self.base / 'log' / 'munged.log'}",
                               f"--seed-file={self.base / 'munge' / 'munge.seed'}"], pidfile)

    def _start_mariadb(self) -> None:
        data = self.base / "mysql"
        subprocess.run(["mysql_install_db", f"--datadir={data}", "--user=root", "--skip-test-db",
                        "--auth-root-authentication-method=normal"], capture_output=True, check=True)
        pidfile = self.base / "run" / "mariadb.pid"
        log = open(self.base / "log" / "mariadb.log", "w")
        subprocess.Popen(["mariadbd", f"--datadir={data}", "--user=root", f"--port={self.ports['mysql']}",
                          "--bind-address=127.0.0.1", f"--socket={self.base / 'run' / 'mysql.sock'}",
                          f"--pid-file={pidfile}"], stdout=log, stderr=log,
                         start_new_session=True)
        _wait(lambda: self._port_open(self.ports["mysql"]), "mariadb")
        self.pidfiles.append(pidfile)

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _write_configs(self) -> None:
        b, p = self.base, self.ports
        memory_mb = 4000
        nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p[n]} CPUs=2 "
                          f"RealMemory={memory_mb} State=UNKNOWN" for n in NODES)
        self.conf.write_text(f"""ClusterName=ci
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={p['ctld']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
MailProg=/bin/true
StateSaveLocation={b}/state/ctld
SlurmdSpoolDir={b}/state/d/%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={p['dbd']}
AccountingStoragePass={self.socket}
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        dbd = b / "etc" / "slurmdbd.conf"
        dbd.write_text(f"""AuthType=auth/munge
AuthInfo=socket={self.socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={p['dbd']}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={p['mysql']}
StorageUser=root
StorageLoc=slurm_acct_db
PidFile={b}/run/slurmdbd.pid
LogFile={b}/log/slurmdbd.log
""")
        os.chmod(dbd, 0o600)

    # ---------------------------------------------------------------------------------------- using
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        env = {**self.env, **kwargs.pop("env", {})}
        done = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
        return done

    def job_state(self, job_id: str) -> str:
        out = self.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False).stdout.split()
        if out:
            return out[0]
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip() or "UNKNOWN"

    def wait_job(self, job_id: str, timeout: float = 600) -> str:
        end = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state.split()[0].rstrip("+") in end:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted((self.base / "log").glob("*.log")))
