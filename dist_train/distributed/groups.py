"""The one home of torch.distributed process groups and of the device binding.

Nothing else in dist_train creates or destroys a process group. `ProcessGroups.start` runs once per run on
every rank, before anything collective happens, and does, in this order:

  1. binds the device the launch facts chose (`torch.cuda.set_device`), and, where this machine's hostname
     resolves to a loopback address while the job spans machines, tells gloo which interface to use
     (network.py; `notes` says so);
  2. joins the default group, whose backend is decided in one place (`choose_backend`): NCCL bound to the
     device (`device_id`) on CUDA, `cuda:nccl,cpu:gloo` where CPU tensors go through it (FSDP2's CPU
     offload), gloo on CPU. One process gets a group only when its backend needs one alone (FSDP2, DeepSpeed);
  3. creates the side groups, eagerly and in a fixed order on every rank (group creation is collective):
       control     gloo, for the main thread's small agreements that must not wait on the device: the stop
                   agreement (supervise/signals.py) and the data verdicts (data/agreement.py). Both issue
                   their collectives from the main thread in the same order on every rank.
       checkpoint  gloo, for DCP's background save thread (`checkpoint.async_save`): on the default group
                   its collectives would interleave with the training ones and both sides would wait forever.
                   Also at world size 1 when a default group exists, since torch's async saver needs a CPU group.

`teardown` destroys what `start` made, once, at the end. Strategies, agreements, the checkpointer and the
watchdog take their groups (and the rendezvous store) from here. `deepspeed_environment` is what DeepSpeed
is told about this process, so that it binds the same device dist_train chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch

from ..config import ConfigError
from .environment import DistEnv


@dataclass(frozen=True)
class GroupNeeds:
    """What a run needs from torch.distributed, decided from its config before any group exists."""

    alone: bool = False  # a default group even for one process (FSDP2's fully_shard, DeepSpeed's engine)
    cpu_collectives: bool = False  # CPU tensors reduced through the default group (FSDP2 cpu_offload)
    background_checkpoint: bool = False  # DCP's asynchronous save runs collectives from a thread of its own
    backend: Optional[str] = None  # strategy.backend: None = chosen by the device


def choose_backend(dist_env: DistEnv, needs: GroupNeeds) -> str:
    """The default group's backend string; the only place it is decided."""
    cuda = dist_env.device.startswith("cuda")
    if needs.backend == "nccl" and not cuda:
        raise ConfigError("strategy.backend=nccl needs CUDA and this process has no GPU; set strategy.backend=gloo or leave it unset")
    if needs.backend == "gloo" or not cuda:
        return "gloo"
    # torchtitan's rule: a CPU tensor in an NCCL-only group fails ("No backend type associated with device
    # type cpu"); FSDP2's gradient-norm full_tensor() on CPU-offloaded shards is one.
    return "cuda:nccl,cpu:gloo" if needs.cpu_collectives else "nccl"


def deepspeed_environment(dist_env: DistEnv) -> dict[str, str]:
    """The variables DeepSpeed reads about this process. DeepSpeed binds the device with
    `set_device(int(LOCAL_RANK))` (its engine and zero.Init), so on CUDA LOCAL_RANK is the index of the device
    dist_train chose: 0 for a process that sees one GPU (srun --gpus-per-task=1, one GPU per pod), whatever
    its place on the node. RANK and WORLD_SIZE are set too: Slurm and MPI launches do not export them."""
    device = torch.device(dist_env.device)
    device_rank = (device.index or 0) if device.type == "cuda" else dist_env.local_rank
    return {
        "LOCAL_RANK": str(device_rank),
        "RANK": str(dist_env.global_rank),
        "WORLD_SIZE": str(dist_env.world_size),
        "LOCAL_WORLD_SIZE": str(dist_env.local_world_size),
    }


class ProcessGroups:
    """The groups of this process, made by `start` and destroyed by `teardown`; built once per run."""

    def __init__(
        self,
        dist_env: DistEnv,
        backend: str,
        active: bool,
        owns_default: bool,
        control: Any = None,
        checkpoint: Any = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.dist_env = dist_env
        self.backend = backend
        self.active = active  # a default group exists (world size > 1, or a backend that needs one alone)
        self._owns_default = owns_default
        self.control = control  # gloo; None at world size 1 (an agreement of one needs no collective)
        self.checkpoint = checkpoint  # gloo; None unless an asynchronous DCP save needs it
        self.notes = notes  # what start decided about this machine, for its first process to print

    @classmethod
    def start(cls, dist_env: DistEnv, needs: GroupNeeds = GroupNeeds(), timeout_seconds: float = 1800.0) -> "ProcessGroups":
        import torch.distributed as dist

        if dist_env.device.startswith("cuda"):
            torch.cuda.set_device(dist_env.torch_device)
        backend = choose_backend(dist_env, needs)
        wanted = dist_env.distributed or needs.alone
        owns_default = False
        notes: tuple[str, ...] = ()
        if wanted and not dist.is_initialized():
            notes = _choose_gloo_interface(dist_env)
            _init_default_group(dist_env, backend, timeout_seconds)
            owns_default = True
        active = dist.is_available() and dist.is_initialized()
        if active and not owns_default:
            backend = str(dist.get_backend())  # a group the caller made (a user's script): used as it is
        timeout = timedelta(seconds=timeout_seconds)
        # Side groups in a fixed order on every rank: new_group is collective over the default group.
        control = dist.new_group(backend="gloo", timeout=timeout) if active and dist_env.distributed else None
        checkpoint = dist.new_group(backend="gloo", timeout=timeout) if active and needs.background_checkpoint else None
        return cls(dist_env, backend, active, owns_default, control, checkpoint, notes)

    @property
    def device(self) -> torch.device:
        return self.dist_env.torch_device

    def broadcast_from_main(self, obj: object) -> object:
        """The main process's `obj` on every rank (a decision taken once, e.g. which checkpoint to load)."""
        if not (self.active and self.dist_env.distributed):
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_from_all(self, obj: object) -> list:
        """Every rank's `obj`, in rank order, on every rank (over the control group: no device involved)."""
        if not (self.active and self.dist_env.distributed):
            return [obj]
        import torch.distributed as dist

        gathered: list = [None] * self.dist_env.world_size
        dist.all_gather_object(gathered, obj, group=self.control)
        return gathered

    def rendezvous_store(self, timeout_seconds: float) -> Any:
        """A connection of its own to the default group's key-value store (the watchdog's heartbeats), or None.

        The store is a TCP server no collective uses after start-up, so it answers while a collective is stuck."""
        if not (self.active and self.dist_env.distributed):
            return None
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        try:
            store = store.clone()  # the main thread may be using the store
        except (AttributeError, RuntimeError):
            pass
        store.set_timeout(timedelta(seconds=timeout_seconds))
        return store

    def teardown(self) -> None:
        """Destroy what `start` made (a default group the caller made stays, with only our side groups gone)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._owns_default:
            dist.destroy_process_group()  # every group goes with the default one
        else:
            for group in (self.checkpoint, self.control):
                if group is not None:
                    dist.destroy_process_group(group)
        self.control = self.checkpoint = None
        self.active = False


def _choose_gloo_interface(dist_env: DistEnv) -> tuple[str, ...]:
    """Every gloo group made from here on (ours, DeepSpeed's, DCP's) reads GLOO_SOCKET_IFNAME when it is made."""
    import os

    from .network import GLOO_SOCKET_IFNAME, choose_gloo_interface

    choice = choose_gloo_interface(dist_env, os.environ)
    if choice is None:
        return ()
    os.environ[GLOO_SOCKET_IFNAME] = choice[0]
    return (choice[1],)


def _init_default_group(dist_env: DistEnv, backend: str, timeout_seconds: float) -> None:
    import torch.distributed as dist

    # Under torchrun the rendezvous store already lives in the agent (TORCHELASTIC_USE_AGENT_STORE): env://
    # connects to it, whereas tcp:// would try to open a second server on the same port.
    init_method = "env://" if dist_env.torchrun_store else f"tcp://{dist_env.master_addr}:{dist_env.master_port}"
    # device_id binds NCCL's communicator to this process's GPU at init, rather than NCCL guessing it from
    # the current device at the first collective (torch >= 2.3).
    bound = dict(device_id=dist_env.torch_device) if dist_env.device.startswith("cuda") and "nccl" in backend else {}
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=dist_env.global_rank,
        world_size=dist_env.world_size,
        timeout=timedelta(seconds=timeout_seconds),
        **bound,
    )
