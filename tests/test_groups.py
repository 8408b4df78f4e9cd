"""One module owns the process groups and the device (distributed/groups.py): which groups exist, with
which backends, and what DeepSpeed is told, at world size 1 and 2; and the defects that came from groups
being made in five places (issue 21). Their CUDA halves are tests/test_gpu.py's (make gpu-check)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from dist_train.config import ConfigError, load_config
from dist_train.distributed.environment import DistEnv
from dist_train.distributed.groups import GroupNeeds, choose_backend, deepspeed_environment
from tests.procs import REPO, dist_train, run, worker

PACKAGE = REPO / "dist_train"
MLP = ["configs/mlp_digits.yaml", "data.source=digits", "train.progress_bar=false"]


def _probe(tmp_path: Path, nproc: int, *overrides: str) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"probe{nproc}"
    worker("groups_probe.py", [str(out), *overrides], nproc=nproc, timeout=180)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


# ---------------------------------------------------------------- which groups exist


@pytest.mark.slow
def test_groups_at_world_size_1_and_2_with_async_save_and_fsdp2(tmp_path):
    # One process under DDP needs no group at all; FSDP2 needs one alone, and with async_save the checkpoint
    # group too: torch's async saver asserts a CPU-capable group (on a GPU the default one is NCCL-only).
    assert _probe(tmp_path / "ddp1", 1, "checkpoint.async_save=true") == [
        {"backend": "gloo", "active": False, "control": None, "checkpoint": None, "default": None, "initialized_after_teardown": False}
    ]
    assert _probe(tmp_path / "fsdp1", 1, "strategy.name=fsdp2", "checkpoint.async_save=true") == [
        {"backend": "gloo", "active": True, "control": None, "checkpoint": "gloo", "default": "gloo", "initialized_after_teardown": False}
    ]
    two = _probe(tmp_path / "ddp2", 2, "checkpoint.async_save=true")
    assert two[0] == two[1] == {"backend": "gloo", "active": True, "control": "gloo", "checkpoint": "gloo", "default": "gloo", "initialized_after_teardown": False}
    plain = _probe(tmp_path / "plain2", 2)
    assert plain[0]["control"] == "gloo" and plain[0]["checkpoint"] is None


def test_the_backend_is_chosen_in_one_place():
    cuda = DistEnv(device="cuda:0")
    assert choose_backend(DistEnv(), GroupNeeds()) == "gloo"
    assert choose_backend(cuda, GroupNeeds()) == "nccl"
    # FSDP2's cpu_offload reduces CPU shards (the gradient norm's full_tensor()) through the default group.
    assert choose_backend(cuda, GroupNeeds(cpu_collectives=True)) == "cuda:nccl,cpu:gloo"
    assert choose_backend(cuda, GroupNeeds(backend="gloo")) == "gloo"
    with pytest.raises(ConfigError, match="strategy.backend=nccl needs CUDA"):
        choose_backend(DistEnv(), GroupNeeds(backend="nccl"))


def test_strategies_say_what_they_need_from_the_groups():
    from dist_train.strategies import strategy_class

    def needs(*overrides: str) -> GroupNeeds:
        cfg = load_config(None, list(overrides))
        return strategy_class(cfg.strategy.name).group_needs(cfg)

    assert needs() == GroupNeeds()
    assert needs("checkpoint.async_save=true") == GroupNeeds(background_checkpoint=True)
    assert needs("strategy.name=fsdp2", "strategy.fsdp2.cpu_offload=true") == GroupNeeds(alone=True, cpu_collectives=True)
    assert needs("strategy.name=deepspeed", "checkpoint.async_save=true") == GroupNeeds(alone=True)  # DeepSpeed saves synchronously


def test_deepspeed_is_told_the_device_dist_train_chose():
    # srun --gpus-per-task=1 (or one GPU per pod): local rank 1 sees one GPU and trains on cuda:0; DeepSpeed
    # calls set_device(int(LOCAL_RANK)), which was "invalid device ordinal" when it was told LOCAL_RANK=1.
    one_gpu_each = DistEnv(global_rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1, num_nodes=2, device="cuda:0")
    assert deepspeed_environment(one_gpu_each) == {"LOCAL_RANK": "0", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    all_gpus = DistEnv(global_rank=1, local_rank=1, world_size=2, local_world_size=2, device="cuda:1")
    assert deepspeed_environment(all_gpus)["LOCAL_RANK"] == "1"
    assert deepspeed_environment(DistEnv(global_rank=1, local_rank=1, world_size=2, local_world_size=2))["LOCAL_RANK"] == "1"


# ---------------------------------------------------------------- the house


def _imports(path: Path) -> set[str]:
    """dist_train modules `path` imports (relative imports resolved), at any depth of the file."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.startswith("dist_train"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dist_train")}
    return found


def test_process_groups_are_created_in_one_module_and_no_imports_circle():
    files = sorted(PACKAGE.rglob("*.py"))
    makers = [str(f.relative_to(REPO)) for f in files if re.search(r"\b(new_group|init_process_group|destroy_process_group)\(", f.read_text())]
    assert makers == ["dist_train/distributed/groups.py"], makers
    modules = {".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f for f in files}
    graph = {m: {t for t in _imports(f) if t in modules and t != m} for m, f in modules.items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    # A package's face may re-export its own modules; any other loop is a circle.
    circles = [m for m in graph if any(reaches(t, m, set()) for t in graph[m] if not t.startswith(m + "."))]
    assert circles == [], circles
    assert not any(t.startswith("dist_train.strategies") for t in _imports(PACKAGE / "config" / "tree.py"))


def test_strategy_names_registry_and_config_sections_agree():
    from dist_train.config import StrategyConfig
    from dist_train.strategies import STRATEGIES

    import dataclasses
    import typing

    names = set(typing.get_args(typing.get_type_hints(StrategyConfig)["name"]))
    sections = {f.name for f in dataclasses.fields(StrategyConfig) if dataclasses.is_dataclass(f.default_factory) if f.default_factory is not dataclasses.MISSING}  # type: ignore[arg-type]
    assert names == set(STRATEGIES) == sections


@pytest.mark.parametrize(("old", "new"), [
    ("strategy.zero_stage=3", "strategy.deepspeed.zero_stage"),
    ("strategy.deepspeed_config=x.json", "strategy.deepspeed.config"),
    ("strategy.cpu_offload=true", "strategy.fsdp2.cpu_offload"),
    ("strategy.reshard_after_forward=false", "strategy.fsdp2.reshard_after_forward"),
    ("strategy.sync_batchnorm=true", "strategy.ddp.sync_batchnorm"),
    ("strategy.find_unused_parameters=true", "strategy.ddp.find_unused_parameters"),
])  # fmt: skip
def test_the_old_flat_strategy_keys_are_refused_naming_the_new_key(old, new):
    with pytest.raises(ConfigError, match=f"config key '{old.split('=')[0]}' was renamed: use {re.escape(new)}"):
        load_config(None, [old])


# ---------------------------------------------------------------- the defects


@pytest.mark.slow
def test_stop_at_the_last_step_is_the_end_of_the_run(tmp_path):
    result = dist_train(["train", *MLP, "train.max_steps=4", "train.stop_at_step=4", f"output_dir={tmp_path}"], timeout=120)
    assert (tmp_path / "model.pt").is_file() and json.loads((tmp_path / "summary.json").read_text())["optimizer_steps"] == 4
    assert "done: 4 optimizer steps" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun (tests/install_system_deps.sh installs it)")
def test_a_slow_rank_after_a_successful_run_does_not_exit_75(tmp_path):
    # Under mpirun (as under Slurm) rank 0 hosts the rendezvous store. It used to tear down and exit while
    # rank 1 was still closing; rank 1's watchdog then lost the store and exited 75 after a successful run.
    env = {
        "OMPI_MCA_oob_tcp_if_include": "lo", "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_rmaps_base_oversubscribe": "1",
        **({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}),
    }  # fmt: skip
    cmd = ["mpirun", "-np", "2", "--bind-to", "none", sys.executable, str(REPO / "tests" / "workers" / "slow_teardown.py"),
           "train", *MLP, "train.max_steps=6", "strategy.hang_timeout_seconds=4", f"output_dir={tmp_path}"]  # fmt: skip
    result = run(cmd, timeout=180, env=env, check=False)
    assert result.returncode == 0 and "HANG" not in result.output, result.output[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["optimizer_steps"] == 6


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (tests/install_system_deps.sh installs it)")
def test_deepspeed_files_are_synced_before_the_checkpoint_is_marked_complete(tmp_path):
    pytest.importorskip("deepspeed")
    trace = tmp_path / "strace.log"
    out = tmp_path / "run"
    cmd = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=openat,fsync,fdatasync,close,rename,renameat,renameat2", "-o", str(trace),
           sys.executable, "-m", "dist_train", "train", "configs/mlp_digits_zero2.yaml", "data.source=digits", "train.progress_bar=false",
           "train.max_steps=2", f"output_dir={out}"]  # fmt: skip
    run(cmd, timeout=300)
    opened: dict[tuple[str, str], str] = {}  # (pid, fd) -> path, as strace -f shows them
    synced: set[str] = set()
    for line in trace.read_text().splitlines():
        pid, _, call = line.partition(" ")
        if m := re.match(r'openat\(AT_FDCWD, "([^"]+)", .*\) = (\d+)$', call):
            opened[(pid, m.group(2))] = os.path.normpath(m.group(1))
        elif (m := re.match(r"f(?:data)?sync\((\d+)\)", call)) and (pid, m.group(1)) in opened:
            synced.add(opened[(pid, m.group(1))])
    written = sorted((out / "checkpoints" / "step-00000002" / "zero").iterdir())
    assert written, "no DeepSpeed files"
    # They were written under the temporary name and renamed once COMPLETE was there.
    unsynced = [p.name for p in written if os.path.normpath(str(p).replace("step-00000002", ".tmp-step-00000002")) not in synced]
    assert unsynced == [], f"not fsynced before the checkpoint was marked COMPLETE: {unsynced}"
