"""A real Slurm cluster for tests on two emulated hosts: slurmctld and slurmd on node1, slurmd on node2.

The hosts are an emulated cluster (tests/cluster.py): node1 and node2 each have their own network address,
hostname, /etc/hosts, /tmp and /dev/shm, so `slurm/multi_node.sbatch`, preemption and requeue run across
machines as on a real cluster (the rendezvous host is node1's address, node2's tasks reach it over the
bridge). One munged runs on the host; its socket, the key, slurm.conf, the spool, state and logs are in the
cluster's shared root, so every daemon and client finds them at the same path. Everything lives in that
root (its own slurm.conf, munge key and socket), so nothing touches a system Slurm or munge. No systemd: each
daemon runs in the foreground (slurmctld and the slurmd in their nodes) and is stopped by its process group;
the job processes slurmd starts (slurmstepd, the tasks) live in the nodes too, and go when the nodes go.

Client commands (sbatch, scontrol, squeue, scancel) run on node1, the head node: only the nodes reach the
controller. A test's files (job scripts, logs, output_dir) must be in `tmp(name)`, a directory of the shared
filesystem, as on a real cluster.

Facts this relies on (Slurm 22.05 from Debian): `AuthInfo=cred_expire=5` and the fast scheduler settings make
a requeued job restart in about 6 s; slurmd -N NAME on a host whose name is NAME.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from .cluster import Cluster, unavailable
from .procs import Result, kill_group

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
NODES = ("node1", "node2")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def why_not() -> str:
    """Why the Slurm tests cannot run here ('' when they can)."""
    missing = missing_binaries()
    if missing:
        return f"Slurm/munge binaries missing ({', '.join(missing)}); run tests/install_system_deps.sh as root"
    return unavailable()


SLURM_CONF = """\
ClusterName=dist_train_test
SlurmctldHost={head}({head_address})
SlurmctldPort=6817
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
        self.hosts: Optional[Cluster] = None
        self.root = Path("/nonexistent")
        self.conf = self.root / "slurm.conf"
        self._munged: Optional[subprocess.Popen] = None
        self._daemons: list[tuple[str, subprocess.Popen]] = []
        self._dirs = itertools.count()

    @property
    def env(self) -> dict:
        """Environment for Slurm client commands (and, through sbatch's --export=ALL, for the jobs)."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def head(self):
        return self.hosts.nodes[0]

    def tmp(self, name: str) -> Path:
        """A new directory on the cluster's shared filesystem (job scripts, logs, output_dir)."""
        path = self.hosts.shared / f"{name}-{next(self._dirs)}"
        path.mkdir(parents=True)
        return path

    # ------------------------------------------------------------ start / stop

    def start(self, timeout: float = 60) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise RuntimeError("the test Slurm cluster runs slurmctld/slurmd as root and munged as user munge: run the Slurm tests as root")
        self.hosts = Cluster(len(NODES)).start()
        self.root = self.hosts.root / "slurm"
        self.conf = self.root / "slurm.conf"
        for sub in ("state", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        nodes = "\n".join(
            f"NodeName={node.name} NodeHostname={node.hostname} NodeAddr={node.address} Port=6818 CPUs=4 State=UNKNOWN" for node in self.hosts.nodes
        )
        self.conf.write_text(
            SLURM_CONF.format(
                head=self.head.hostname,
                head_address=self.head.address,
                root=self.root,
                first_job_id=random.randint(1000, 9000),
                nodes=nodes,
                node_list=",".join(NODES),
            )
        )
        self._spawn(self.head, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in self.hosts.nodes:
            self._spawn(node, f"slurmd-{node.name}", ["slurmd", "-D", "-N", node.name, "-f", str(self.conf)])
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
        for parent in (self.root, self.hosts.root):
            parent.chmod(0o755)
        # On the host: the nodes reach it through its socket, a path in the shared root (Unix sockets cross network namespaces).
        log = open(self.root / "munged.out", "wb")
        self._munged = subprocess.Popen(
            [
                "munged", "--foreground", f"--key-file={key}", f"--socket={munge_dir}/munge.socket",
                f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed",
            ],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True, user="munge", group="munge", extra_groups=[],
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        while not (munge_dir / "munge.socket").exists():
            if self._munged.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create its socket\n{self.logs()}")
            time.sleep(0.1)

    def _spawn(self, node, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")
        proc = node.popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        log.close()
        self._daemons.append((name, proc))

    def _check_daemons_alive(self) -> None:
        for name, proc in self._daemons:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel jobs, stop the daemons (newest first), then the nodes (with any job process left) and munged."""
        try:
            if any(name == "slurmctld" and proc.poll() is None for name, proc in self._daemons):
                self.command(["scancel", "--full", "--partition=debug"], check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.command(["squeue", "-h"], check=False).stdout.strip():
                    time.sleep(0.5)
            for _, proc in reversed(self._daemons):
                if proc.poll() is None:
                    kill_group(proc, signal.SIGTERM)
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        kill_group(proc)
                        proc.wait()
            self._daemons.clear()
        finally:
            if self.hosts is not None:
                self.hosts.close()  # every process of both nodes, slurmstepd and job tasks included
            if self._munged is not None and self._munged.poll() is None:
                self._munged.terminate()
                self._munged.wait(timeout=15)

    # ------------------------------------------------------------ jobs

    def command(self, cmd: Sequence[str], check: bool = True, timeout: float = 60) -> Result:
        """A Slurm client command on the head node."""
        result = self.head.run([str(c) for c in cmd], env=self.env, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, script: Path, args: Sequence[str] = (), sbatch_args: Sequence[str] = (), env: Optional[dict] = None) -> str:
        """Submits SCRIPT from the head node; returns the job id. `env` adds variables the job inherits (sbatch exports ALL)."""
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *args]
        result = self.head.run(cmd, env={**(env or {}), **self.env}, timeout=60, check=False)
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
