"""Starting real processes from tests: torchrun jobs and the CLI, bounded in time, never left behind.

Each job runs in its own session (process group); on timeout the whole group is killed by its id, so a
hung collective fails the test instead of hanging CI, and no process or port outlives the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


# Variables that launch engines set for the processes they start: torchrun, Slurm, accelerate, MPI (Open MPI,
# MPICH/Intel MPI's Hydra, PMIx), Kubeflow (PET_*), SkyPilot. A test process inherits none of them.
LAUNCHER_PREFIXES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "TORCHELASTIC", "ACCELERATE_", "GROUP_RANK", "LOCAL_WORLD_SIZE",
    "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "PET_", "SKYPILOT_",
)  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: Optional[dict] = None) -> dict:
    """The parent's environment minus launcher variables a test process must not inherit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["WANDB_MODE"] = env.get("WANDB_MODE", "offline")
    if extra:
        env.update(extra)
    return env


def run(cmd: Sequence[str], timeout: float = 300, env: Optional[dict] = None, cwd: Optional[Path] = None, check: bool = True) -> Result:
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(cwd or REPO),
        env=clean_env(env),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s (a hang): {' '.join(map(str, cmd))}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}")
    finally:
        kill_group(proc)
    result = Result(proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n--- stdout\n{stdout[-6000:]}\n--- stderr\n{stderr[-6000:]}")
    return result


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def torchrun(args: Sequence[str], nproc: int = 2, timeout: float = 300, env: Optional[dict] = None, check: bool = True, extra_torchrun: Sequence[str] = ()) -> Result:
    """`torchrun --nproc_per_node N ARGS` on a free port (standalone rendezvous)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *extra_torchrun, *args]
    return run(cmd, timeout=timeout, env=env, check=check)


def dist_train(args: Sequence[str], nproc: int = 1, timeout: float = 300, env: Optional[dict] = None, check: bool = True) -> Result:
    """The CLI as a user runs it: plain process for nproc=1, under torchrun otherwise."""
    if nproc == 1:
        return run([sys.executable, "-m", "dist_train", *args], timeout=timeout, env=env, check=check)
    return torchrun(["-m", "dist_train", *args], nproc=nproc, timeout=timeout, env=env, check=check)


def worker(script: str, args: Sequence[str] = (), nproc: int = 2, timeout: float = 300, env: Optional[dict] = None, check: bool = True) -> Result:
    """Run tests/workers/SCRIPT under torchrun (or plainly for nproc=1)."""
    path = WORKERS / script
    if nproc == 1:
        return run([sys.executable, str(path), *args], timeout=timeout, env=env, check=check)
    return torchrun([str(path), *args], nproc=nproc, timeout=timeout, env=env, check=check)


def final_model(out: Path) -> dict:
    """The plain state_dict a finished run leaves in OUT/model.pt."""
    import torch

    return torch.load(out / "model.pt", weights_only=True)


def assert_same_parameters(a: dict, b: dict) -> None:
    """Bit for bit: the same keys and torch.equal tensors."""
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@contextmanager
def http_server(folder: Path, log: Path, probe: str) -> Iterator[str]:
    """`python -m http.server` on 127.0.0.1 serving `folder` (its request log in `log`), up once `probe` (a path
    under it) answers; yields its base URL and stops it by process group."""
    import time
    import urllib.request

    port = free_port()
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/{probe}", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_group(server)
