"""Launcher detection, accelerate reconciliation and the preemption pieces, from environment dicts (no processes)."""

from __future__ import annotations

import os
import signal

import pytest

from dist_train.config import ConfigError, explicit_keys, load_config, raw_config
from dist_train.config.accelerate import reconcile_launcher_settings
from dist_train.distributed.environment import DistEnv, LaunchError, choose_device, detect_environment
from dist_train.supervise.signals import requeue_slurm_job, resolve_signal, stop_on_signals
from tests.engines import pytorchjob_pod, skypilot_node, trainjob_pod

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


def test_slurm_batch_script_without_srun_is_a_plain_process_only_with_one_task():
    batch_script = {k: v for k, v in SRUN_TASK.items() if k not in ("SLURM_STEP_ID", "SLURM_LOCALID", "SLURM_NODEID")}
    e = detect({**batch_script, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1"})
    assert (e.launcher, e.world_size, e.slurm_job_id) == ("plain", 1, "4242")
    # Four tasks asked for, but the batch script runs training itself: four "rank 0" runs were the old answer.
    with pytest.raises(LaunchError, match=r"^SLURM_NTASKS=4, .* say several processes were started.*SLURM_STEP_ID is missing.*start training with `srun"):
        detect({**batch_script, "SLURM_PROCID": "0"})


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


def test_srun_step_counts_win_over_the_jobs():
    # sbatch --ntasks-per-node=4, then `srun -n 2` on one node: SLURM_NTASKS_PER_NODE is still the job's 4.
    step = {**SRUN_TASK, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4", "SLURM_JOB_NODELIST": "node1",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "node1"}  # fmt: skip
    e = detect(step)
    assert (e.launcher, e.global_rank, e.world_size, e.local_world_size, e.num_nodes) == ("slurm", 1, 2, 2, 1)
    # sbatch --nodes 2 --ntasks-per-node=2, then `srun --nodes 2 --ntasks 2 torchrun ...`: one launcher per node.
    torchrun_step = {**SRUN_TASK, "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2",
                     "SLURM_STEP_TASKS_PER_NODE": "1(x2)", **TORCHRUN}  # fmt: skip
    assert (detect(torchrun_step).launcher, detect(torchrun_step).global_rank) == ("torchrun", 3)


# ---------------------------------------------------------------- MPI, Kubeflow, SkyPilot (variables as each engine sets them)

# Open MPI 4.1 `mpirun -np 4 --hostfile h` (2 slots per host), rank 3: recorded from Debian's openmpi-bin.
OPEN_MPI = {
    "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_COMM_WORLD_NODE_RANK": "1", "OMPI_MCA_ess_base_jobid": "2030895105", "PMIX_RANK": "3", "PMIX_NAMESPACE": "2030895105",
}  # fmt: skip
# MPICH / Intel MPI `mpiexec -n 4 -ppn 2` (Hydra), rank 3.
HYDRA = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "5"}


def facts(e) -> tuple:
    return (e.launcher, e.global_rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank, e.num_nodes)


def test_open_mpi_facts_and_rendezvous():
    e = detect({**OPEN_MPI, "MASTER_ADDR": "node1"})
    assert facts(e) == ("mpi", 3, 4, 1, 2, 1, 2) and e.master_addr == "node1"
    # MPI gives no port: every rank derives the same one from the job id, unless MASTER_PORT is exported.
    assert 20000 <= e.master_port < 40000 and e.master_port == detect({**OPEN_MPI, "OMPI_COMM_WORLD_RANK": "0", "MASTER_ADDR": "node1"}).master_port
    assert detect({**OPEN_MPI, "MASTER_ADDR": "node1", "MASTER_PORT": "12345"}).master_port == 12345
    one_machine = detect({**OPEN_MPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert one_machine.master_addr == "127.0.0.1" and one_machine.num_nodes == 1
    with pytest.raises(LaunchError, match="export MASTER_ADDR"):
        detect(OPEN_MPI)  # two machines and no address to meet at


def test_mpirun_inside_a_slurm_allocation_takes_mpis_rank():
    # mpirun starts one daemon per node through srun, so SLURM_PROCID numbers the node, not the process.
    env = {**SRUN_TASK, "SLURM_PROCID": "1", "SLURM_LOCALID": "0", **OPEN_MPI, "MASTER_ADDR": "node1"}
    assert facts(detect(env)) == ("mpi", 3, 4, 1, 2, 1, 2)


def test_mpich_hydra_facts_and_srun_pmi2():
    assert facts(detect({**HYDRA, "MASTER_ADDR": "node1"})) == ("mpi", 3, 4, 1, 2, 1, 2)
    # srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE too, but no MPI_LOCALRANKID: Slurm's own variables decide.
    assert detect({**SRUN_TASK, "PMI_RANK": "3", "PMI_SIZE": "4"}).launcher == "slurm"


def test_kubeflow_pytorchjob_one_process_per_pod():
    for index in range(2):
        e = detect(pytorchjob_pod(index, nproc_per_node="auto"))
        assert facts(e) == ("kubeflow-pytorchjob", index, 2, 0, 1, index, 2)
        assert (e.master_addr, e.master_port) == ("job-master-0", 23456)


def test_kubeflow_pytorchjob_with_processes_per_pod_needs_torchrun():
    # 1 pod x 2 processes: WORLD_SIZE=2 counts processes while RANK is the pod; started directly only one runs.
    with pytest.raises(LaunchError, match=r"asks for 2 processes per pod.*`torchrun -m dist_train train CONFIG`"):
        detect(pytorchjob_pod(0, pods=1, nproc_per_node="2"))
    # Under torchrun (which reads PET_*) the workers get torchrun's RANK/LOCAL_RANK/WORLD_SIZE.
    worker = {**pytorchjob_pod(0, pods=1, nproc_per_node="2"), "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert facts(detect(worker)) == ("torchrun", 1, 2, 1, 2, 0, 1)
    with pytest.raises(LaunchError, match="elastic range"):
        detect({**pytorchjob_pod(1), "PET_NNODES": "1:4"})


def test_kubeflow_trainjob_one_process_per_pod():
    e = detect(trainjob_pod(1))
    assert facts(e) == ("kubeflow-trainjob", 1, 2, 0, 1, 1, 2) and (e.master_addr, e.master_port) == ("job-node-0-0.job", 29500)
    for per_pod in ("2", "auto"):  # 'auto' is resolved by torchrun alone
        with pytest.raises(LaunchError, match=f"asks for {per_pod} processes per pod"):
            detect(trainjob_pod(1, nproc_per_node=per_pod))


def test_skypilot_facts():
    e = detect(skypilot_node(1))
    assert facts(e) == ("skypilot", 1, 2, 0, 1, 1, 2) and e.master_addr == "10.0.0.1"
    assert 20000 <= e.master_port < 40000 and e.master_port == detect(skypilot_node(0)).master_port
    assert detect(skypilot_node(1, task_id="sky-other_mycluster_2")).master_port != e.master_port
    with pytest.raises(LaunchError, match="SKYPILOT_NODE_IPS lists 1 addresses"):
        detect({**skypilot_node(1), "SKYPILOT_NODE_IPS": "10.0.0.1"})
    # accelerators: A100:8 with one dist_train per node would train on one GPU of eight.
    with pytest.raises(LaunchError, match=r"SKYPILOT_NUM_GPUS_PER_NODE=8 .*--nproc-per-node \$SKYPILOT_NUM_GPUS_PER_NODE"):
        detect({**skypilot_node(1), "SKYPILOT_NUM_GPUS_PER_NODE": "8"})
    assert detect({**skypilot_node(1), "SKYPILOT_NUM_GPUS_PER_NODE": "1"}).world_size == 2


@pytest.mark.parametrize(
    "env, missing",
    [
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK is missing"),
        ({"WORLD_SIZE": "2"}, "RANK is missing, LOCAL_RANK is missing (torchrun sets"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK is missing"),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, "MPI_LOCALRANKID is missing"),
        ({"PMIX_RANK": "1"}, "PMIx puts no world size"),
        ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"}, "PET_NODE_RANK is missing"),
        ({"SKYPILOT_NUM_NODES": "2"}, "SKYPILOT_NODE_RANK is missing"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "SLURM_STEP_ID is missing"),
        ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "1(x2)"}, "SLURM_STEP_ID is missing"),
    ],
)
def test_a_multi_process_launch_no_detector_resolves_is_refused(env, missing):
    with pytest.raises(LaunchError) as error:
        detect(env)
    message = str(error.value)
    assert "several processes were started" in message and missing in message and "\n" not in message
    assert all(f"{k}={v}" in message for k, v in env.items() if k in ("OMPI_COMM_WORLD_SIZE", "WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "SKYPILOT_NUM_NODES"))


def test_a_single_process_sign_is_not_a_multi_process_launch():
    for env in ({"WORLD_SIZE": "1"}, {"OMPI_COMM_WORLD_SIZE": "1"}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, {"PET_NPROC_PER_NODE": "auto"}):
        assert (detect(env).launcher, detect(env).world_size) == ("plain", 1), env


def test_stale_accelerate_variables_inside_srun_do_not_decide_the_launcher():
    srun_two_tasks = {**SRUN_TASK, "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_PROCID": "1", "SLURM_NODEID": "0"}
    with pytest.raises(LaunchError, match=r"^ACCELERATE_MIXED_PRECISION=bf16 is set but accelerate did not start this process.*srun \(Slurm\) started 2 processes"):
        detect({**srun_two_tasks, "ACCELERATE_MIXED_PRECISION": "bf16"})
    # `srun -n 1 accelerate launch --num_processes 1`: one process either way, accelerate's settings count.
    one_task = {**srun_two_tasks, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    e = detect({**one_task, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert (e.launcher, e.world_size, e.accelerate.mixed_precision) == ("accelerate", 1, "bf16")


# ---------------------------------------------------------------- devices


def test_device_is_the_local_rank_when_the_process_sees_all_of_its_nodes_gpus():
    for local_rank in range(4):
        assert choose_device(DistEnv(global_rank=4 + local_rank, world_size=8, local_rank=local_rank, local_world_size=4), visible_cuda_devices=4) == f"cuda:{local_rank}"
    assert choose_device(DistEnv(), visible_cuda_devices=8) == "cuda:0"


def test_device_is_cuda0_when_the_process_sees_exactly_one_gpu():
    # --gpus-per-task=1 or a per-process CUDA_VISIBLE_DEVICES: local rank 3 trains on the one device it sees.
    for local_rank in range(4):
        assert choose_device(DistEnv(global_rank=local_rank, world_size=4, local_rank=local_rank, local_world_size=4), visible_cuda_devices=1) == "cuda:0"


def test_device_without_gpus_is_cpu_and_a_partial_view_is_refused():
    assert choose_device(DistEnv(local_rank=1, local_world_size=2, world_size=2, global_rank=1), visible_cuda_devices=0) == "cpu"
    with pytest.raises(LaunchError, match="local rank 3 of 4 processes on this node sees 2 GPUs"):
        choose_device(DistEnv(global_rank=3, world_size=4, local_rank=3, local_world_size=4), visible_cuda_devices=2)


# ---------------------------------------------------------------- accelerate launch


def accelerate_env(**settings: str) -> dict:
    return {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no", **settings}


def reconcile(env: dict, overrides: list[str], preset: str = "configs/cnn_digits.yaml"):
    cfg = load_config(preset, overrides)
    dist_env = detect(env)
    taken = reconcile_launcher_settings(cfg, dist_env.accelerate, dist_env.world_size, explicit_keys(raw_config(preset, overrides)))
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
    assert (cfg.train.precision, cfg.strategy.name, cfg.strategy.deepspeed.zero_stage, cfg.train.grad_clip) == ("bf16", "deepspeed", 3, 1.5)
    # Accumulation is derived from the global batch, so accelerate's 2 steps set it: 8 x 2 ranks x 2.
    assert cfg.train.global_batch_size == 32
    assert len(taken) == 5 and any("gradient_accumulation_steps=2" in line for line in taken)


@pytest.mark.parametrize(
    "settings, overrides, both",
    [
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["train.precision=fp32"], ("mixed_precision=bf16", "train.precision=fp32")),
        ({"ACCELERATE_MIXED_PRECISION": "no"}, ["train.precision=fp16"], ("mixed_precision=fp32", "train.precision=fp16")),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["strategy.name=ddp"], ("distributed_type=deepspeed", "strategy.name=ddp")),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, ["strategy.deepspeed.zero_stage=2"], ("zero_stage=3", "strategy.deepspeed.zero_stage=2")),
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
