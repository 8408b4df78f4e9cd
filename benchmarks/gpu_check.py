"""GPU proof kit: proves dist_train's CUDA path on one GPU in one go and prints ONE table.

  python benchmarks/gpu_check.py                 # on a CUDA machine (make gpu-check); under 8 minutes
  python benchmarks/gpu_check.py --device cpu    # the same checks, smaller, on CPU (CI runs this mode)

Rows of the table (also written to benchmarks/results/gpu_check.json):
  header      device name, driver, torch / CUDA versions, the bf16 peak MFU is computed against
  test        every `gpu`-marked test (tests/test_gpu.py, tests/test_deepspeed.py): pass / FAIL / skip;
              (FSDP2's rows are its gpu tests, tests/test_gpu.py::test_fsdp2_*; a "not built" row stands in
              for them if none is found)
  throughput  dist_train's loop against the hand-written loop on the same device, interleaved rounds:
              the CNN (fp32) and ResNet-18 at 224x224 in bf16 (32x32 fp32 on CPU): samples/s, ratio to the
              hand loop, MFU (FLOPs per step counted by FlopCounterMode), peak memory
  checkpoint  how long save() blocks the loop, sync vs async, ResNet-18 + Adam (benchmarks/bench_checkpoint.py)
  data wait   the share of the device's time spent idle between optimizer steps, from CUDA events around
              each step (host clocks on CPU), next to the trainer's own host-clock data_wait_fraction

Timing: clocks are read only after torch.cuda.synchronize(); warm-up steps are excluded. Every section runs in
a subprocess with its own time limit, so a crash or hang costs only its rows; the tests get what is left of
--budget-s. The table is printed whatever fails; the exit status is 1 when any row failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GPU_TEST_FILES = ["tests/test_gpu.py", "tests/test_deepspeed.py"]
COLUMNS = [  # (json key, printed title)
    ("kind", "kind"),
    ("check", "check"),
    ("status", "status"),
    ("samples_per_s", "samples/s"),
    ("vs_hand", "x hand"),
    ("mfu_pct", "MFU %"),
    ("peak_mem_mb", "peak MB"),
    ("seconds", "seconds"),
    ("data_wait_pct", "wait %"),
    ("note", "note"),
]
NUMBER_COLUMNS = ["samples_per_s", "vs_hand", "mfu_pct", "peak_mem_mb", "seconds", "data_wait_pct"]
FAILED = {"FAIL", "ERROR", "timeout", "not run"}
# Dense bf16 tensor-core peaks from the vendor's data sheets (TFLOP/s), matched against the device name.
NOMINAL_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0)]
# Per device kind: the sizes each section runs at and its time limit (seconds).
PLANS = {
    "cuda": {"rounds": 2, "cnn_batch": 64, "cnn_steps": (10, 60), "resnet_batch": 128, "resnet_image": 224, "resnet_precision": "bf16",
             "resnet_steps": (5, 30), "wait_steps": 20, "ckpt_repeats": 2,
             "limits": {"header": 60, "throughput_cnn": 75, "throughput_resnet18": 120, "checkpoint": 75, "data_wait": 60}},
    "cpu": {"rounds": 1, "cnn_batch": 64, "cnn_steps": (2, 8), "resnet_batch": 8, "resnet_image": 32, "resnet_precision": "fp32",
            "resnet_steps": (1, 3), "wait_steps": 6, "ckpt_repeats": 1,
            "limits": {"header": 60, "throughput_cnn": 60, "throughput_resnet18": 60, "checkpoint": 60, "data_wait": 60}},
}


def row(kind: str, check: str, status: str, note: str = "", **numbers: Optional[float]) -> dict:
    out: dict[str, Any] = {"kind": kind, "check": check, "status": status}
    out.update({key: numbers.get(key) for key in NUMBER_COLUMNS})
    out["note"] = note
    return out


# ---------------------------------------------------------------- sections (each runs in its own process)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mem_mb(device: Any) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU: the process's peak RSS (KiB on Linux)


def section_header(plan: dict, args: argparse.Namespace) -> dict:
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    info: dict[str, Any] = {"device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["driver"] = _driver_version()
    else:
        import platform

        info["device"] = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
        info["driver"] = "n/a"
    peak, source = _peak_flops(device, info["device"])
    info["peak_tflops"], info["peak_source"] = peak / 1e12, source
    rows = [
        row("header", "device", "info", info["device"]),
        row("header", "driver", "info", info["driver"]),
        row("header", "torch", "info", f"torch {info['torch']}, CUDA {info['cuda']}"),
        row("header", "MFU peak", "info", f"{peak / 1e12:.1f} TFLOP/s ({source})" if peak >= 1e12 else f"{peak / 1e9:.1f} GFLOP/s ({source})"),
    ]
    return {"header": info, "rows": rows}


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    import torch

    version = torch._C._cuda_getDriverVersion()  # the CUDA driver API version when nvidia-smi is absent
    return f"CUDA driver API {version // 1000}.{version % 1000 // 10}"


def _peak_flops(device: Any, name: str) -> tuple[float, str]:
    """The device's bf16 dense peak by name (nominal), else a measured matmul rate (bf16 on GPU, fp32 on CPU)."""
    import torch

    if device.type == "cuda":
        for key, tflops in NOMINAL_BF16_TFLOPS:
            if key in name:
                return tflops * 1e12, f"nominal bf16 dense, {key}"
    n, dtype, iters = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    rate = 2 * n**3 * iters / (time.perf_counter() - start)
    return rate, f"measured {str(dtype).replace('torch.', '')} {n}x{n} matmul"


def _timed_steps(device: Any, warmup: int, steps: int) -> tuple[Callable[[], None], Callable[[], None], dict]:
    """(before_step, after_step, result): call around every step; result['seconds'] covers steps warmup+1..warmup+steps."""
    state = {"calls": 0, "start": 0.0, "seconds": float("nan"), "peak_mem_mb": float("nan")}

    def before() -> None:
        if state["calls"] == warmup:
            _sync(device)
            _peak_mem_reset(device)
            state["start"] = time.perf_counter()

    def after() -> None:
        state["calls"] += 1
        if state["calls"] == warmup + steps:
            _sync(device)
            state["seconds"] = time.perf_counter() - state["start"]
            state["peak_mem_mb"] = _peak_mem_mb(device)

    return before, after, state


def _throughput_config(model: str, plan: dict, out: Path, steps: int) -> list[str]:
    common = ["data.source=digits", f"train.max_steps={steps}", f"train.log_interval={steps}", "train.eval_interval=1000000",
              "train.progress_bar=false", "checkpoint.save_at_end=false", f"output_dir={out}"]
    if model == "cnn":
        batch = plan["cnn_batch"]
        return [*common, f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}"]
    batch = plan["resnet_batch"]
    return [*common, f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}", "model.freeze_backbone=false",
            f"model.image_size={plan['resnet_image']}", f"train.precision={plan['resnet_precision']}"]


PRESETS = {"cnn": "cnn_digits.yaml", "resnet18": "resnet18_digits.yaml"}


def _dist_train_loop(model: str, plan: dict, warmup: int, steps: int, out: Path) -> dict:
    from dist_train.config import load_config
    from dist_train.distributed.environment import detect_environment
    from dist_train.run import start_process_groups
    from dist_train.trainer import Trainer

    cfg = load_config(REPO / "configs" / PRESETS[model], _throughput_config(model, plan, out, warmup + steps))
    trainer = Trainer.build(cfg, start_process_groups(cfg, detect_environment()))
    trainer.console.enabled = False
    before, after, result = _timed_steps(trainer.strategy.device, warmup, steps)
    step = trainer._optimizer_step

    def timed(*a: Any, **k: Any) -> Any:
        before()
        value = step(*a, **k)
        after()
        return value

    trainer._optimizer_step = timed
    try:
        trainer.fit()
    finally:
        trainer.close()
    result["samples_per_s"] = steps * cfg.train.global_batch_size / result["seconds"]
    return result


def _hand_loop(model_name: str, plan: dict, warmup: int, steps: int, out: Path) -> dict:
    """The tutorial's loop: DataLoader over pre-resized tensors, to(device), forward, loss, backward, step."""
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from dist_train.config import load_config
    from dist_train.data import load_source
    from dist_train.data.transforms import adapt_images
    from dist_train.distributed.environment import detect_environment
    from dist_train.models import build_model, model_spec
    from dist_train.trainer import seed_everything

    cfg = load_config(REPO / "configs" / PRESETS[model_name], _throughput_config(model_name, plan, out, warmup + steps))
    device = detect_environment().torch_device
    spec = model_spec(cfg.model)
    source = load_source(cfg.data, spec)
    X = adapt_images(source.train.inputs, spec.input_shape)
    batch = cfg.train.global_batch_size
    loader = DataLoader(TensorDataset(X, source.train.targets), batch_size=batch, shuffle=True, drop_last=True)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    o = cfg.optim
    if o.name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=o.lr)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    before, after, result = _timed_steps(device, warmup, steps)
    model.train()
    done = 0
    while done < warmup + steps:
        for inputs, targets in loader:
            before()
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                outputs = model(inputs)
            loss = F.cross_entropy(outputs.float(), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            after()
            done += 1
            if done == warmup + steps:
                break
    result["samples_per_s"] = steps * batch / result["seconds"]
    return result


def _flops_per_step(model_name: str, plan: dict, out: Path) -> float:
    """Model FLOPs of one optimizer step (forward + backward of the global batch), counted by FlopCounterMode."""
    import torch
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from dist_train.config import load_config
    from dist_train.distributed.environment import detect_environment
    from dist_train.models import build_model, model_spec

    cfg = load_config(REPO / "configs" / PRESETS[model_name], _throughput_config(model_name, plan, out, 1))
    device = detect_environment().torch_device
    spec = model_spec(cfg.model)
    model = build_model(cfg.model).to(device)
    inputs = torch.randn(cfg.train.global_batch_size, *spec.input_shape, device=device)
    targets = torch.zeros(cfg.train.global_batch_size, dtype=torch.long, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = model(inputs)
        F.cross_entropy(outputs.float(), targets).backward()
    return float(counter.get_total_flops())


def section_throughput(model: str, plan: dict, args: argparse.Namespace) -> dict:
    warmup, steps = plan[f"{model}_steps"] if model == "cnn" else plan["resnet_steps"]
    label = "cnn fp32" if model == "cnn" else f"resnet18 {plan['resnet_image']}px {plan['resnet_precision']}"
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        out = Path(tmp)
        flops = _flops_per_step(model, plan, out / "flops")
        hand, ours = [], []
        for round_ in range(plan["rounds"]):  # interleaved, so drift hits both loops alike
            hand.append(_hand_loop(model, plan, warmup, steps, out / f"hand{round_}"))
            ours.append(_dist_train_loop(model, plan, warmup, steps, out / f"ours{round_}"))
    peak = args.peak_flops
    rows = []
    hand_rate = statistics.median(r["samples_per_s"] for r in hand)
    batch = plan["cnn_batch"] if model == "cnn" else plan["resnet_batch"]
    for name, runs in (("hand loop", hand), ("dist_train", ours)):
        rates = [r["samples_per_s"] for r in runs]
        rate = statistics.median(rates)
        spread = f"{min(rates):.0f}-{max(rates):.0f}" if len(rates) > 1 else "1 round"
        rows.append(row(
            "throughput", f"{label} {name}", "measured",
            f"batch {batch}, {steps} timed steps after {warmup} warm-up, median of {len(rates)} (spread {spread}); {flops / 1e9:.1f} GFLOP/step",
            samples_per_s=rate, vs_hand=rate / hand_rate, mfu_pct=100 * flops * rate / batch / peak,
            peak_mem_mb=max(r["peak_mem_mb"] for r in runs), seconds=statistics.median(r["seconds"] for r in runs),
        ))
    return {"rows": rows}


def section_checkpoint(plan: dict, args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_checkpoint import measure

    with tempfile.TemporaryDirectory(prefix="gpu_check_ckpt_") as tmp:
        result = measure(Path(tmp), plan["ckpt_repeats"])
    rows = []
    for mode in ("sync", "async"):
        r = result[mode]
        rows.append(row(
            "checkpoint", f"resnet18+adam {mode} save blocks the loop", "measured",
            f"{r['size_mb']:.0f} MB on {result['device']}; complete on disk after {r['complete_s']:.2f} s; load {r['load_s']:.2f} s",
            seconds=r["blocked_s"],
        ))
    return {"rows": rows}


def section_data_wait(plan: dict, args: argparse.Namespace) -> dict:
    """Device idle time between optimizer steps over one log window, against the trainer's logged fraction."""
    import torch

    from dist_train.cli import main as cli_main
    from dist_train.config import load_config
    from dist_train.distributed.environment import detect_environment
    from dist_train.observe.tracking import Tracker
    from dist_train.run import start_process_groups
    from dist_train.trainer import Trainer

    if not (REPO / "data" / "digits" / "train").is_dir():
        cli_main(["data", "prepare", "--source", "digits", "--out", str(REPO / "data" / "digits")])
    window = plan["wait_steps"]
    rows = []
    for source in ("shards", "digits"):
        with tempfile.TemporaryDirectory(prefix="gpu_check_wait_") as tmp:
            cfg = load_config(REPO / "configs" / "cnn_digits.yaml", [
                f"data.source={source}", f"train.max_steps={2 * window}", f"train.log_interval={window}", "train.eval_interval=1000000",
                "train.progress_bar=false", "checkpoint.save_at_end=false", f"output_dir={tmp}", "train.global_batch_size=64", "train.micro_batch_size=64",
            ])
            trainer = Trainer.build(cfg, start_process_groups(cfg, detect_environment()))
            trainer.console.enabled = False
            logged: list[float] = []

            class WaitRecorder(Tracker):
                def log(self, metrics: dict, step: int) -> None:
                    if "train/data_wait_fraction" in metrics:
                        logged.append(metrics["train/data_wait_fraction"])

            trainer.tracker = WaitRecorder()
            device = trainer.strategy.device
            marks: list[tuple[Any, Any]] = []  # (start, end) of every step: CUDA events, or host clock readings on CPU
            step = trainer._optimizer_step

            def clock() -> Any:
                if device.type != "cuda":
                    return time.perf_counter()
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                return event

            def marked(*a: Any, **k: Any) -> Any:
                start = clock()
                value = step(*a, **k)
                marks.append((start, clock()))
                return value

            trainer._optimizer_step = marked
            try:
                trainer.fit()
            finally:
                trainer.close()
            _sync(device)
            second = marks[window:]  # the second log window: no warm-up, same steps as logged[1]

            def seconds(a: Any, b: Any) -> float:
                return a.elapsed_time(b) / 1e3 if device.type == "cuda" else b - a

            span = seconds(second[0][0], second[-1][1])
            busy = sum(seconds(s, e) for s, e in second)
            idle = max(span - busy, 0.0) / span
            how = "CUDA events" if device.type == "cuda" else "host clock"
            rows.append(row(
                "data wait", f"cnn from {'webdataset shards' if source == 'shards' else 'in-memory digits'}", "measured",
                f"device idle between steps {window + 1}-{2 * window} ({how}); the trainer logged {100 * logged[1]:.1f}% (host clock)",
                data_wait_pct=100 * idle, seconds=span,
            ))
    return {"rows": rows}


SECTIONS: dict[str, Callable[..., dict]] = {
    "header": lambda plan, args: section_header(plan, args),
    "throughput_cnn": lambda plan, args: section_throughput("cnn", plan, args),
    "throughput_resnet18": lambda plan, args: section_throughput("resnet18", plan, args),
    "checkpoint": section_checkpoint,
    "data_wait": section_data_wait,
}


# ---------------------------------------------------------------- the driver


def _child_env(device: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("WANDB_MODE", "disabled")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode on a GPU machine too
    return env


def _run_bounded(cmd: list[str], limit: float, device: str) -> tuple[Optional[int], str, str]:
    """(exit status or None on timeout, stdout, stderr). The command runs in its own session and the whole
    session is killed at the limit, so no worker it started (torchrun ranks) keeps holding the GPU."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(device), cwd=str(REPO), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the command left behind
        except (ProcessLookupError, PermissionError):
            pass


def run_section(name: str, args: argparse.Namespace, limit: float, extra: list[str] = ()) -> dict:
    kind = {"data_wait": "data wait"}.get(name, name.split("_")[0])  # the kind its rows would have had
    with tempfile.TemporaryDirectory(prefix="gpu_check_section_") as tmp:
        out = Path(tmp) / "section.json"
        cmd = [sys.executable, __file__, "--section", name, "--section-out", str(out), "--device", args.device, *extra]
        started = time.perf_counter()
        returncode, stdout, stderr = _run_bounded(cmd, limit, args.device)
        if returncode is None:
            return {"rows": [row(kind, name, "timeout", f"no result within {limit:.0f} s")]}
        if returncode != 0 or not out.is_file():
            last = [line for line in (stderr or stdout).strip().splitlines() if line.strip()][-1:] or ["no output"]
            return {"rows": [row(kind, name, "FAIL", f"exit {returncode}: {last[0][:200]}", seconds=time.perf_counter() - started)]}
        return json.loads(out.read_text())


def run_tests(args: argparse.Namespace, limit: float, on_cuda: bool) -> list[dict]:
    files = GPU_TEST_FILES if on_cuda else GPU_TEST_FILES[:1]  # on CPU all skip: spare CI DeepSpeed's import
    with tempfile.TemporaryDirectory(prefix="gpu_check_tests_") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-v", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--timeout={args.test_timeout_s}", f"--junitxml={junit}", f"--basetemp={Path(tmp) / 'pytest'}"]
        returncode, stdout, _ = _run_bounded(cmd, max(limit, 30), args.device)
        timed_out = returncode is None
        rows = _junit_rows(junit) if junit.is_file() and not timed_out else _verbose_rows(stdout)
        if timed_out:
            rows.append(row("test", "remaining gpu tests", "not run", f"the tests' share of --budget-s ({limit:.0f} s) ran out"))
        elif not rows:
            tail = stdout.strip().splitlines()[-1:] or ["no output"]
            rows.append(row("test", "pytest -m gpu", "ERROR", tail[0][:200]))
    if not any("fsdp2" in r["check"] for r in rows):
        rows.append(row("test", "fsdp2 bf16", "not built", "no gpu test with fsdp2 in its name was found"))
    return rows


def _short_test_id(classname: str, name: str) -> str:
    return f"{classname.rsplit('.', 1)[-1]}::{name}"


def _junit_rows(path: Path) -> list[dict]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, note = "pass", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status = "FAIL" if child.tag == "failure" else "ERROR"
                note = (child.get("message") or "").strip().splitlines()[0][:200] if child.get("message") else ""
            elif child.tag == "skipped":
                status, note = "skip", (child.get("message") or "")[:200]
        rows.append(row("test", _short_test_id(case.get("classname", ""), case.get("name", "")), status, note, seconds=float(case.get("time", "nan"))))
    return rows


def _verbose_rows(stdout: str) -> list[dict]:
    status_of = {"PASSED": "pass", "FAILED": "FAIL", "ERROR": "ERROR", "SKIPPED": "skip", "XFAIL": "skip", "XPASS": "pass"}
    rows = []
    for match in re.finditer(r"^tests/(\S+?)\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", stdout, re.MULTILINE):
        rows.append(row("test", f"{match.group(1)}::{match.group(2)}", status_of[match.group(3)]))
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(r: dict, key: str) -> str:
        value = r.get(key)
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value)

    cells = [[cell(r, key) for key, _ in COLUMNS] for r in rows]
    titles = [title for _, title in COLUMNS]
    widths = [max([len(t), *(len(c[i]) for c in cells)]) for i, t in enumerate(titles)]
    widths[-1] = len(titles[-1])  # the note runs on unpadded
    line = lambda values: "  ".join(v.ljust(w) if i in (0, 1, 2, len(values) - 1) else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))  # noqa: E731
    out = [line(titles), "  ".join("-" * w for w in widths)]
    out.extend(line(c) for c in cells)
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when torch sees a GPU")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-time budget for the whole kit (tests get what the benchmarks leave)")
    parser.add_argument("--test-timeout-s", type=int, default=180, help="per-test time limit (pytest-timeout)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--json", default=str(RESULTS / "gpu_check.json"))
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--section-out", help=argparse.SUPPRESS)
    parser.add_argument("--peak-flops", type=float, default=float("nan"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.section:  # a child: one section, its rows as JSON
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
        Path(args.section_out).write_text(json.dumps(SECTIONS[args.section](PLANS[kind], args)))
        return 0

    started = time.perf_counter()
    header = run_section("header", args, PLANS["cuda"]["limits"]["header"])
    info = header.get("header", {})
    kind = info.get("device_type") or ("cuda" if args.device == "cuda" else "cpu")
    if args.device == "cuda" and kind != "cuda":
        print("gpu_check: --device cuda but torch sees no GPU", file=sys.stderr)
    plan = PLANS[kind]
    rows = list(header["rows"])
    peak = info.get("peak_tflops", float("nan")) * 1e12
    for name in ("throughput_cnn", "throughput_resnet18", "checkpoint", "data_wait"):
        section_start = time.perf_counter()
        rows.extend(run_section(name, args, plan["limits"][name], ["--peak-flops", repr(peak)])["rows"])
        print(f"gpu_check: {name} took {time.perf_counter() - section_start:.1f} s", flush=True)
    if not args.skip_tests:
        left = args.budget_s - (time.perf_counter() - started)
        print(f"gpu_check: gpu-marked tests ({left:.0f} s left of the budget) ...", flush=True)
        tests_start = time.perf_counter()
        rows.extend(run_tests(args, left, kind == "cuda"))
        print(f"gpu_check: tests took {time.perf_counter() - tests_start:.1f} s", flush=True)
    total = time.perf_counter() - started
    rows.append(row("total", "gpu_check wall time", "info", f"--device {args.device} ({kind})", seconds=total))

    print()
    print(format_table(rows))
    failed = [r for r in rows if r["status"] in FAILED]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "gpu_check", "header": info, "columns": [k for k, _ in COLUMNS], "rows": rows,
                               "failed": len(failed), "total_seconds": total}, indent=2, allow_nan=True))
    print(f"\n{len(failed)} failed; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
