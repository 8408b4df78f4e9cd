"""`dist-train launch`: build the torchrun command for one node of a job, check the config, run it.

  dist-train launch --nproc-per-node 2 CONFIG [overrides]                                 one node
  dist-train launch --nproc-per-node 2 --nnodes 2 --rdzv-endpoint HOST:PORT CONFIG [...]  on every node

One node uses torchrun's standalone rendezvous (a free local port). Several nodes use c10d rendezvous on
HOST:PORT, which the first node to arrive serves; c10d numbers nodes in arrival order, so --node-rank is
passed along but only a static rendezvous would honour it (nothing in dist_train depends on it: the
checkpoint writer is global rank 0 wherever it lands). With --max-restarts K torchrun restarts all
workers after a failure and dist_train resumes them from the newest checkpoint (TORCHELASTIC_RESTART_COUNT
> 0 turns on train.resume=auto).

torchrun is started with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (unless set otherwise): when the workers share
the rendezvous store with the agent, a restarted worker can read the previous attempt's rank-0 address from
it and fail to connect (pytorch/pytorch#135712; reproduced here with gloo). Raw `torchrun --max-restarts`
users should set it too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .config import batch_arithmetic, config_from_dict, explicit_keys, raw_config
from .config.deepspeed_json import reconcile_deepspeed_json
from .distributed.environment import LaunchError


def torchrun_command(args: argparse.Namespace) -> list[str]:
    if args.nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc_per_node)]
    if str(args.nnodes) in ("1", "1:1") and not args.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        if not args.rdzv_endpoint:
            raise LaunchError(
                f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT: the address of one node and a free port, "
                "the same on every node"
            )
        if ":" not in args.rdzv_endpoint:
            raise LaunchError(f"--rdzv-endpoint {args.rdzv_endpoint} must be HOST:PORT")
        cmd += [
            "--nnodes", str(args.nnodes),
            "--node_rank", str(args.node_rank),
            "--rdzv_backend", "c10d",
            "--rdzv_endpoint", args.rdzv_endpoint,
            "--rdzv_id", args.rdzv_id or "dist_train",
        ]  # fmt: skip
    if args.max_restarts:
        cmd += ["--max_restarts", str(args.max_restarts)]
    return cmd + ["-m", "dist_train", "train", args.config, *args.overrides]


def _describe(args: argparse.Namespace) -> tuple[list[str], str]:
    """Checks the config before any process starts; (the lines worth printing, the preemption signal's name)."""
    from .supervise.signals import resolve_signal

    raw = raw_config(args.config, args.overrides)
    cfg = config_from_dict(raw)
    preemption_signal = resolve_signal(cfg.train.preemption_signal).name
    world_size = int(args.nnodes) * args.nproc_per_node if str(args.nnodes).isdigit() else None
    # The DeepSpeed JSON is checked here too, so a conflict is one line before any process starts.
    lines = [f"dist-train: {line}" for line in reconcile_deepspeed_json(cfg, explicit_keys(raw), world_size)]
    if world_size is not None:
        lines.append(f"batch: {batch_arithmetic(cfg.train, world_size).describe()}")
    if args.max_restarts and not (cfg.checkpoint.interval_steps or cfg.checkpoint.interval_seconds):
        lines.append(
            f"warning: --max-restarts {args.max_restarts} without periodic checkpoints restarts from step 0; "
            "set checkpoint.interval_steps (or checkpoint.interval_seconds)"
        )
    return lines, preemption_signal


def launch_command(args: argparse.Namespace) -> int:
    cmd = torchrun_command(args)
    lines, preemption_signal = _describe(args)
    env = dict(os.environ)
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers; any other signal (Slurm's
    # --signal=USR2@120 reaches the agent too) kills the agent and leaves the workers training unsupervised.
    # Handled, the agent sends it on to the workers, which save, stop, and exit before the agent does.
    # torchrun's --signals-to-handle (recent torch) reads its PET_ variable, which older torchrun ignores.
    env.setdefault("PET_SIGNALS_TO_HANDLE", f"SIGTERM,SIGINT,SIGHUP,SIGQUIT,{preemption_signal}")
    # The command as it runs, environment included: a dry run's line pasted into a shell does the same.
    shown = " ".join(f"{key}={shlex.quote(env[key])}" for key in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "PET_SIGNALS_TO_HANDLE"))
    shown = f"{shown} {shlex.join(cmd)}"
    if args.dry_run:
        print("\n".join([*lines, shown]), flush=True)
        return 0
    print("\n".join([*lines, f"dist-train launch: {shown}"]), flush=True)
    # exec, not a child: Ctrl-C and the scheduler's signals reach torchrun directly, and its exit status is ours.
    os.execve(cmd[0], cmd, env)
    raise AssertionError("unreachable")  # pragma: no cover
