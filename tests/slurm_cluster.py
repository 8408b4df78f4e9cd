"""A real single-machine Slurm cluster for tests: munged, slurmctld and two slurmd (node1, node2).

Everything lives in one temporary directory with its own slurm.conf, munge key and socket, so nothing
touches a system Slurm or munge. No systemd: each daemon runs in the foreground as a child of the test
process and is stopped by its PID. Job processes (slurmstepd, the job's tasks) are not our children;
`stop()` cancels the jobs, waits for them, and finally ends any process that still carries this
cluster's SLURM_CONF in its environment (by PID, never by name).

Facts this relies on (Slurm 22.05 from Debian): several slurmd may run on one host under different
NodeNames; `AuthInfo=cred_expire=5` and the fast scheduler settings make a requeued job restart in about
6 s; the node names must resolve (tests/install_system_deps.sh adds `127.0.0.1 node1 node2`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
NODES = ("node1", "node2")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=dist_train_test
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
FirstJobId={first_job_id}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobRequeue=1
SchedulerParameters=sched_interval=2,sched_min_interval=100000,batch_sched_delay=0,bf_interval=1
MpiDefault=none
ReturnToService=2
KillWait=10
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self) -> None:
        # Not pytest's tmp_path: its parents are private to root and munged runs as user munge.
        self.root = Path(tempfile.mkdtemp(prefix="dist_train_slurm_"))
        self.conf = self.root / "slurm.conf"
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    @property
    def env(self) -> dict:
        """Environment for Slurm client commands (and, through sbatch's --export=ALL, for the jobs)."""
        return {"SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------ start / stop

    def start(self, timeout: float = 60) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise RuntimeError("the test Slurm cluster runs slurmctld/slurmd as root and munged as user munge: run the Slurm tests as root")
        unresolved = [n for n in NODES if not _resolves(n)]
        if unresolved:
            raise RuntimeError(f"{', '.join(unresolved)} do not resolve; run tests/install_system_deps.sh (adds '127.0.0.1 node1 node2' to /etc/hosts)")
        for sub in ("state", "spool/node1", "spool/node2"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        nodes = "\n".join(
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} CPUs=4 State=UNKNOWN" for name in NODES
        )
        self.conf.write_text(
            SLURM_CONF.format(
                hostname=socket.gethostname().split(".")[0],
                ctld_port=_free_port(),
                root=self.root,
                first_job_id=random.randint(1000, 9000),
                nodes=nodes,
                node_list=",".join(NODES),
            )
        )
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for name in NODES:
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_daemons_alive()
            out = self.command(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in NODES):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"Slurm nodes not idle after {timeout}s: {out!r}\n{self.logs()}")

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(parents=True, exist_ok=True)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        # munged insists on running as its own user, on a key only it can read, in a directory all can enter.
        shutil.chown(munge_dir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        munge_dir.chmod(0o755)
        key.chmod(0o400)
        os.chmod(self.root, 0o755)
        self._spawn(
            "munged",
            [
                "munged", "--foreground", f"--key-file={key}", f"--socket={munge_dir}/munge.socket",
                f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed",
            ],
            user="munge",
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not (munge_dir / "munge.socket").exists():
            self._check_daemons_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create its socket\n{self.logs()}")
            time.sleep(0.1)

    def _spawn(self, name: str, cmd: list[str], user: Optional[str] = None) -> None:
        log = open(self.root / f"{name}.out", "wb")
        extra = dict(user=user, group=user, extra_groups=[]) if user else {}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env={**os.environ, **self.env}, start_new_session=True, **extra)
        log.close()
        self._daemons.append((name, proc))

    def _check_daemons_alive(self) -> None:
        for name, proc in self._daemons:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel jobs, stop the daemons (newest first) by PID, then end stray job processes of this cluster."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._daemons):
            self.command(["scancel", "--full", "--partition=debug"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.command(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for _, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._daemons.clear()
        _end_processes_with_env("SLURM_CONF", str(self.conf))
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ jobs

    def command(self, cmd: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **self.env}, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, script: Path, args: Sequence[str] = (), sbatch_args: Sequence[str] = (), env: Optional[dict] = None) -> str:
        """Submits SCRIPT; returns the job id. `env` adds variables the job inherits (sbatch exports ALL)."""
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {}), **self.env}, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        out = self.command(["scontrol", "show", "job", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_state(self, job_id: str, states: Sequence[str], timeout: float) -> dict:
        """Polls (sbatch --wait backs off to 32 s) until the job reaches one of `states`."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 2000) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")) + sorted(self.root.glob("munge/*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


def _resolves(host: str) -> bool:
    try:
        socket.gethostbyname(host)
        return True
    except OSError:
        return False


def _end_processes_with_env(key: str, value: str) -> None:
    """Job steps are daemonised by slurmd, so they are not our children; they still carry our SLURM_CONF."""
    import psutil

    strays = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(key) == value:
                strays.append(proc)
        except (psutil.Error, OSError):
            continue
    for proc in strays:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(strays, timeout=10)
