"""Launcher detection, accelerate reconciliation and the preemption pieces, from environment dicts (no processes)."""

from __future__ import annotations

import os
import signal

import pytest

from dist_train.config import ConfigError, explicit_keys, load_config, raw_config
from dist_train.env import LaunchError, detect_environment, reconcile_launcher_settings
from dist_train.signals import requeue_slurm_job, resolve_signal, stop_on_signals

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29400"}
SRUN_TASK = {
    "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "node1,node2",
}  # fmt: skip


def detect(env: dict):
    return detect_environment(env, prefer_cuda=False)


def test_plain_process_is_rank_zero_of_one():
    e = detect({})
    assert (e.launcher, e.global_rank, e.world_size, e.num_nodes, e.restart_count, e.slurm_job_id) == ("plain", 0, 1, 1, 0, None)
    assert e.is_main and not e.distributed and not e.restarted


def test_torchrun_facts():
    e = detect({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "0"})
    assert (e.launcher, e.global_rank, e.local_rank, e.world_size, e.local_world_size) == ("torchrun", 3, 1, 4, 2)
    assert (e.node_rank, e.num_nodes, e.master_addr, e.master_port) == (1, 2, "node1", 29400)
    assert not e.restarted
    assert detect({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "1"}).restart_count == 1


def test_torchrun_rank_wins_over_slurm_procid_under_srun():
    # srun --ntasks-per-node=1 torchrun --nproc-per-node 2: Slurm's task id 1 is the node, RANK is the process.
    env = {**SRUN_TASK, "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)", **TORCHRUN}
    e = detect(env)
    assert (e.launcher, e.global_rank, e.local_rank, e.node_rank, e.world_size) == ("torchrun", 3, 1, 1, 4)
    assert e.slurm_job_id == "4242"


def test_torchrun_under_srun_with_several_tasks_per_node_is_refused():
    with pytest.raises(LaunchError, match="ntasks-per-node=1"):
        detect({**SRUN_TASK, **TORCHRUN})


def test_srun_task_per_process():
    e = detect(SRUN_TASK)
    assert (e.launcher, e.global_rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank, e.num_nodes) == ("slurm", 3, 1, 4, 2, 1, 2)
    assert e.master_addr in ("node1",)  # first host of the nodelist
    assert e.master_port == 20000 + 4242 % 20000  # derived from the job id unless MASTER_PORT is set
    assert detect({**SRUN_TASK, "MASTER_PORT": "12345", "MASTER_ADDR": "10.0.0.1"}).master_port == 12345
    assert not e.restarted and detect({**SRUN_TASK, "SLURM_RESTART_COUNT": "2"}).restart_count == 2


def test_slurm_batch_script_without_srun_is_a_plain_process():
    env = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    e = detect(env)
    assert (e.launcher, e.world_size, e.slurm_job_id) == ("plain", 1, "4242")


def test_slurm_tasks_per_node_disagreeing_with_ntasks_names_the_sbatch_option():
    with pytest.raises(LaunchError, match="--ntasks-per-node"):
        detect({**SRUN_TASK, "SLURM_NTASKS": "3", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"RANK": "4"}, "outside world size 4"),
        ({"LOCAL_RANK": "2"}, "local rank 2 >= processes per node 2"),
        ({"WORLD_SIZE": "3"}, "not a multiple of LOCAL_WORLD_SIZE"),
        ({"RANK": "x"}, "RANK='x' is not an integer"),
    ],
)
def test_inconsistent_torchrun_variables_are_explained(patch, message):
    with pytest.raises(LaunchError, match=message):
        detect({**TORCHRUN, **patch})


# ---------------------------------------------------------------- accelerate launch


def accelerate_env(**settings: str) -> dict:
    return {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no", **settings}


def reconcile(env: dict, overrides: list[str], preset: str = "configs/cnn_digits.yaml"):
    cfg = load_config(preset, overrides)
    taken = reconcile_launcher_settings(cfg, detect(env), explicit_keys(raw_config(preset, overrides)))
    return cfg, taken


def test_accelerate_is_torchrun_plus_its_settings():
    e = detect(accelerate_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_GRADIENT_CLIPPING="none"))
    assert e.launcher == "accelerate" and e.world_size == 2
    assert e.accelerate.mixed_precision == "fp32" and e.accelerate.use_deepspeed and e.accelerate.zero_stage == 3
    assert e.accelerate.grad_clip is None


def test_accelerate_no_mixed_precision_agrees_with_explicit_fp32():
    cfg, taken = reconcile(accelerate_env(), ["train.precision=fp32"])
    assert cfg.train.precision == "fp32" and taken == []


def test_accelerate_settings_fill_keys_the_config_leaves_unset():
    env = accelerate_env(
        ACCELERATE_MIXED_PRECISION="bf16", ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
        ACCELERATE_GRADIENT_CLIPPING="1.5", ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2",
    )  # fmt: skip
    cfg, taken = reconcile(env, ["train.micro_batch_size=8"], preset=None)  # type: ignore[arg-type]
    assert (cfg.train.precision, cfg.strategy.name, cfg.strategy.zero_stage, cfg.train.grad_clip) == ("bf16", "deepspeed", 3, 1.5)
    # Accumulation is derived from the global batch, so accelerate's 2 steps set it: 8 x 2 ranks x 2.
    assert cfg.train.global_batch_size == 32
    assert len(taken) == 5 and any("gradient_accumulation_steps=2" in line for line in taken)


@pytest.mark.parametrize(
    "settings, overrides, both",
    [
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["train.precision=fp32"], ("mixed_precision=bf16", "train.precision=fp32")),
        ({"ACCELERATE_MIXED_PRECISION": "no"}, ["train.precision=fp16"], ("mixed_precision=fp32", "train.precision=fp16")),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["strategy.name=ddp"], ("distributed_type=deepspeed", "strategy.name=ddp")),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, ["strategy.zero_stage=2"], ("zero_stage=3", "strategy.zero_stage=2")),
        ({"ACCELERATE_GRADIENT_CLIPPING": "1.0"}, ["train.grad_clip=0.5"], ("gradient_clipping=1.0", "train.grad_clip=0.5")),
        ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, [], ("gradient_accumulation_steps=4", "derives 1")),
    ],
)
def test_accelerate_disagreement_names_both_values(settings, overrides, both):
    with pytest.raises(ConfigError) as error:
        reconcile(accelerate_env(**settings), overrides)
    for value in both:
        assert value in str(error.value)


def test_accelerate_fsdp_and_fp8_are_refused():
    with pytest.raises(ConfigError, match="FSDP"):
        reconcile(accelerate_env(ACCELERATE_USE_FSDP="true"), [])
    with pytest.raises(ConfigError, match="fp8"):
        reconcile(accelerate_env(ACCELERATE_MIXED_PRECISION="fp8"), [])


# ---------------------------------------------------------------- signals


class _Target:
    stop_requested = False


def test_preemption_signal_names():
    assert resolve_signal("SIGUSR2") is signal.SIGUSR2 and resolve_signal("usr2") is signal.SIGUSR2
    assert resolve_signal(str(int(signal.SIGTERM))) is signal.SIGTERM
    for bad in ("SIGKILL", "NOPE", "99999"):
        with pytest.raises(ConfigError, match="train.preemption_signal"):
            resolve_signal(bad)


def test_signal_sets_stop_request_and_old_handler_returns():
    target = _Target()
    before = signal.getsignal(signal.SIGUSR2)
    with stop_on_signals(target, "SIGUSR2", announce=False) as handler:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert target.stop_requested and handler.received == ["SIGUSR2"] and handler.preempted
    assert signal.getsignal(signal.SIGUSR2) is before


def test_sigterm_stops_but_does_not_ask_for_a_requeue():
    # Under Slurm SIGTERM is scancel or the hard time limit: save and end, requeue only on the preemption signal.
    target = _Target()
    with stop_on_signals(target, "SIGUSR2", announce=False) as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        assert target.stop_requested and handler.received == ["SIGTERM"] and not handler.preempted


def test_requeue_without_scontrol_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    done, message = requeue_slurm_job("77")
    assert not done and "scontrol is not on PATH" in message and "77" in message and "resubmit" in message


def test_single_process_accelerate_launch_still_reports_its_settings():
    e = detect({"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert (e.launcher, e.world_size, e.accelerate.mixed_precision) == ("accelerate", 1, "bf16")
