"""DeepSpeed ZeRO (stages 1, 2, 3) behind the same Strategy contract as DDP.

The DeepSpeed JSON (`strategy.deepspeed_config`) is passed through as it is; dist_train sets only the keys
it owns (micro batch, accumulation, global batch, clipping, bf16/fp16, ZeRO stage), fills DeepSpeed's
"auto" values, and refuses a JSON value that contradicts its own config. Accumulation, loss scaling,
clipping and the LR schedule's stepping are DeepSpeed's: `engine.backward` divides the loss by the
accumulation steps and `engine.step` after every micro-batch advances its micro-step counter, updating
the weights only at the boundary. Checkpoints are DeepSpeed's own sharded files inside the step directory
the Checkpointer hands out, plus dist_train's side state (progress, data position, RNG).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, ContextManager, Optional

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from ..env import init_single_process_group
from ..errors import CheckpointError
from ..config import BatchArithmetic, Config, ConfigError
from .base import StepResult, Strategy, autocast_dtype, check_precision_supported

# DeepSpeed's files live in <step dir>/zero/ (its "tag"); one fixed tag so export and resume need no `latest` file.
CHECKPOINT_TAG = "zero"


# ---------------------------------------------------------------- the DeepSpeed config


def load_user_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"strategy.deepspeed_config={path} does not exist; give a DeepSpeed JSON such as configs/deepspeed/zero2.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"strategy.deepspeed_config={path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"strategy.deepspeed_config={path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def build_deepspeed_config(cfg: Config, arithmetic: BatchArithmetic, user: Optional[dict] = None, source: str = "") -> dict:
    """The user's JSON with dist_train's keys reconciled into it. `source` names the JSON in errors."""
    ds = copy.deepcopy(user or {})
    source = source or "the DeepSpeed config"
    t, precision = cfg.train, cfg.train.precision
    batch = (
        f"train.global_batch_size={arithmetic.global_batch_size} / (train.micro_batch_size="
        f"{arithmetic.micro_batch_size} x {arithmetic.world_size} ranks)"
    )
    owned = [
        ("train_micro_batch_size_per_gpu", arithmetic.micro_batch_size, f"train.micro_batch_size={t.micro_batch_size}"),
        ("gradient_accumulation_steps", arithmetic.grad_accum_steps, batch),
        ("train_batch_size", arithmetic.global_batch_size, f"train.global_batch_size={t.global_batch_size}"),
        ("gradient_clipping", float(t.grad_clip or 0.0), f"train.grad_clip={t.grad_clip}"),
        ("bf16.enabled", precision == "bf16", f"train.precision={precision}"),
        ("fp16.enabled", precision == "fp16", f"train.precision={precision}"),
        ("zero_optimization.stage", cfg.strategy.zero_stage, f"strategy.zero_stage={cfg.strategy.zero_stage}"),
    ]
    for key, value, origin in owned:
        _reconcile(ds, key, value, origin, source)

    # A JSON optimizer/scheduler replaces dist_train's; its "auto" values come from optim.*.
    o = cfg.optim
    fills = {
        "optimizer.params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay, "eps": 1e-8, "momentum": o.momentum},
        "scheduler.params": {"warmup_num_steps": o.warmup_steps, "warmup_max_lr": o.lr, "warmup_min_lr": 0.0},
    }
    for section, values in fills.items():
        params = _get(ds, section)
        if isinstance(params, dict):
            for name, value in values.items():
                if params.get(name) == "auto":
                    params[name] = value
    leftover = _auto_keys(ds)
    if leftover:
        raise ConfigError(
            f"{source} {leftover[0]}=auto: dist_train fills auto only for the batch sizes, accumulation, gradient_clipping, "
            f"bf16/fp16, zero_optimization.stage and optimizer/scheduler lr, betas, eps, weight_decay, warmup; give {leftover[0]} a value"
        )
    if precision != "fp32" and hasattr(deepspeed.runtime.constants, "BUFFER_DTYPE"):
        # DeepSpeed >= 0.18 casts only the parameters and leaves buffers fp32, so a BatchNorm (ResNet-18) gets
        # bf16 weights with fp32 running stats and refuses to run; older DeepSpeed cast the whole module.
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", precision)
    # dist_train hands ZeRO the user's torch optimizer (SGD included), which DeepSpeed otherwise refuses as "untested".
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _reconcile(ds: dict, dotted: str, value: Any, origin: str, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    given = node.get(leaf, "auto")
    if given == "auto" or _same(given, value):
        node[leaf] = value
        return
    raise ConfigError(
        f"{source} {dotted}={json.dumps(given)} but dist_train derives {json.dumps(value)} from {origin}; "
        f"remove {dotted} from {source} or set it to \"auto\""
    )


def _same(given: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(given, bool):
        return given is value
    if isinstance(given, (int, float)) and isinstance(value, (int, float)):
        return float(given) == float(value)
    return False


def _auto_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == "auto" else []


# ---------------------------------------------------------------- the strategy


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(self, cfg: Config, dist_env: Any, arithmetic: BatchArithmetic) -> None:
        super().__init__(cfg, dist_env, arithmetic)
        precision = cfg.train.precision
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                "train.precision=fp16 with strategy.name=deepspeed needs a GPU: DeepSpeed's CPU accelerator has no fp16 "
                "loss-scaling path; set train.precision=bf16 or fp32"
            )
        check_precision_supported(precision, self.device)
        if cfg.strategy.sync_batchnorm:
            raise ConfigError("strategy.sync_batchnorm=true is a DDP option; with strategy.name=deepspeed set it to false")
        path = cfg.strategy.deepspeed_config
        user = load_user_config(path) if path else None
        self.ds_config = build_deepspeed_config(cfg, arithmetic, user, source=path or "")
        self.engine: Any = None
        self._input_cast: Any = None  # the forward pre-hook casting inputs to bf16/fp16
        self._own_process_group = False
        self._saved_environ: dict[str, Optional[str]] = {}

    # ------------------------------------------------------------ setup

    def setup_module(self, model: nn.Module) -> None:
        # DeepSpeed wraps model and optimizer in one call (deepspeed.initialize): that happens in setup_optimizer.
        self._module = model

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.engine.module if self.engine is not None else self._module

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        model = self._module
        # The tutorial's dtypes, so the exported state_dict is fp32 even when DeepSpeed keeps bf16 weights.
        self._state_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        self._join_process_group()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO dumps the whole config on every start
        client_optimizer = None if "optimizer" in self.ds_config else optimizer
        if "scheduler" in self.ds_config:
            client_scheduler: Any = None
        elif client_optimizer is None:
            # dist_train's schedule, re-attached to the optimizer DeepSpeed builds from the JSON.
            lr_lambda = scheduler.lr_lambdas[0]
            client_scheduler = lambda ds_optimizer: torch.optim.lr_scheduler.LambdaLR(ds_optimizer, lr_lambda)  # noqa: E731
        else:
            client_scheduler = scheduler
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model,
            optimizer=client_optimizer,
            model_parameters=[p for p in model.parameters() if p.requires_grad] if client_optimizer is None else None,
            lr_scheduler=client_scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.engine = self.model = engine
        self.optimizer = ds_optimizer
        self.scheduler = ds_scheduler
        compute_dtype = autocast_dtype(self.cfg.train.precision)
        if compute_dtype is not None:
            self._input_cast = engine.module.register_forward_pre_hook(_cast_floating_inputs(compute_dtype))

    def _join_process_group(self) -> None:
        """DeepSpeed must use the group dist_train already joined (gloo on CPU, NCCL on CUDA), never its own."""
        env = self.dist_env
        # DeepSpeedEngine asserts LOCAL_RANK in os.environ and logs from RANK; DistEnv is the truth (Slurm sets neither).
        for key, value in {"LOCAL_RANK": env.local_rank, "RANK": env.global_rank, "WORLD_SIZE": env.world_size,
                           "LOCAL_WORLD_SIZE": env.local_world_size}.items():
            self._saved_environ.setdefault(key, os.environ.get(key))
            os.environ[key] = str(value)
        if self.device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce with g++ (minutes on first use) that
            # only its tensor-parallel inference layers call; training collectives go through torch.distributed.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self._own_process_group = init_single_process_group(env)
        # With a group already initialised this wraps it (no MPI discovery, no second init_process_group).
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False, verbose=False)

    @property
    def steps_scheduler(self) -> bool:
        return True  # engine.step() steps the scheduler at each boundary (and not on an fp16 overflow)

    # ------------------------------------------------------------ the loop

    def autocast(self) -> ContextManager:
        # bf16/fp16.enabled: the engine has cast the module itself and the inputs are cast to match (as its
        # fp16.auto_cast does); torch autocast on top would re-cast every op's inputs for nothing.
        return contextlib.nullcontext()

    def accumulation_context(self, is_last_micro_batch: bool) -> ContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces gradients only at its accumulation boundary

    def backward(self, micro_batch_loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        if self.engine.is_gradient_accumulation_boundary() != is_last_micro_batch:
            raise RuntimeError(
                f"DeepSpeed's micro-step counter disagrees with the loader: an optimizer step must have exactly "
                f"{self.arithmetic.grad_accum_steps} micro-batches (gradient_accumulation_steps)"
            )
        self.engine.backward(micro_batch_loss)  # divides by gradient_accumulation_steps itself
        if not is_last_micro_batch:
            self.engine.step()  # off the boundary this only advances DeepSpeed's micro-step counter

    def optimizer_step(self, compute_grad_norm: bool = True) -> StepResult:
        self.engine.step()  # DeepSpeed computes the norm on every boundary step anyway
        norm = self.engine.get_global_grad_norm()  # before clipping; None when nothing computed it (stage 0)
        grad_norm = torch.full((), float("nan")) if norm is None else torch.as_tensor(norm).detach()
        return StepResult(grad_norm, skipped=not self.engine.was_step_applied())

    def train_mode(self, training: bool) -> None:
        self.engine.train(training)

    def local_parameters(self) -> list[torch.Tensor]:
        # Under ZeRO-3 a module parameter is an empty placeholder; this rank's partition is its ds_tensor.
        params = list(self.engine.module.parameters())
        return [getattr(p, "ds_tensor", p) for p in params]

    # ------------------------------------------------------------ checkpoints

    checkpoint_format = "deepspeed"

    def save_checkpoint(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)

    def load_checkpoint(self, directory: Path, meta: dict) -> None:
        if meta.get("format", "deepspeed" if meta.get("strategy") == "deepspeed" else "dcp") != self.checkpoint_format:
            raise CheckpointError(
                f"checkpoint {directory} was written by strategy.name={meta.get('strategy')} (DCP), which DeepSpeed cannot load; "
                f"resume it with strategy.name={meta.get('strategy')}, or `dist-train export` it and start from the weights (model.weights=...)"
            )
        then_world, then_stage = meta.get("world_size"), meta.get("config", {}).get("strategy", {}).get("zero_stage")
        if then_stage != self.cfg.strategy.zero_stage:
            raise CheckpointError(
                f"checkpoint {directory} was written with strategy.zero_stage={then_stage}, this run has "
                f"strategy.zero_stage={self.cfg.strategy.zero_stage}; set strategy.zero_stage={then_stage}"
            )
        if then_world != self.dist_env.world_size:
            raise CheckpointError(
                f"checkpoint {directory} holds ZeRO partitions of {then_world} processes and this run has "
                f"{self.dist_env.world_size}; resume with {then_world} processes, or `dist-train export` it and "
                "start from the weights (model.weights=...)"
            )
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if load_path is None:
            raise CheckpointError(f"checkpoint {directory} has no DeepSpeed files under {CHECKPOINT_TAG}/; it was not written by strategy.name=deepspeed")

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        module = self.engine.module
        gather: ContextManager = contextlib.nullcontext()
        if self.engine.zero_optimization_stage() == 3:
            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        # The gathers are collective; only the main process, which writes model.pt, copies to CPU.
        keep = self.dist_env.is_main
        with gather:
            state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()} if keep else {}
        if self.cfg.train.precision != "fp32":
            # The weights the module holds are bf16/fp16 copies; the optimizer's fp32 masters are the trained ones.
            for name, param in module.named_parameters():
                master = deepspeed.utils.safe_get_full_fp32_param(param)  # collective under ZeRO
                if keep and master is not None and name in state:
                    state[name] = master.detach().to("cpu", copy=True)
        return {k: v.to(self._state_dtypes.get(k, v.dtype)) for k, v in state.items()}

    def teardown(self) -> None:
        if self._input_cast is not None:
            self._input_cast.remove()
            self._input_cast = None
        if self.engine is not None:
            self.engine.destroy()  # releases ZeRO-3's hooks and buffers
            self.engine = None
        if self._own_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_process_group = False
        for key, value in self._saved_environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_environ.clear()


def _cast_floating_inputs(dtype: torch.dtype) -> Any:
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    return hook


# ---------------------------------------------------------------- export


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The plain fp32 state_dict (tutorial keys) of a dist_train step directory written under any ZeRO stage,
    by DeepSpeed's own consolidation; no process group needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / CHECKPOINT_TAG).is_dir():
        raise CheckpointError(f"{checkpoint_dir} has no DeepSpeed files under {CHECKPOINT_TAG}/; not a strategy.name=deepspeed checkpoint")
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CHECKPOINT_TAG)
    # Clone: the consolidated tensors are views into one flat buffer, which torch.save would write whole.
    # Buffers keep the dtype they were trained in (bf16 under train.precision=bf16); the tutorial's are fp32.
    return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in state.items()}
