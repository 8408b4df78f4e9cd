"""The GPU proof kit's CPU mode, so the script that proves the CUDA path never rots between GPU runs."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.procs import run

pytestmark = pytest.mark.slow

COLUMNS = ["kind", "check", "status", "samples_per_s", "vs_hand", "mfu_pct", "peak_mem_mb", "seconds", "data_wait_pct", "note"]
TITLES = ["kind", "check", "status", "samples/s", "x hand", "MFU %", "peak MB", "seconds", "wait %", "note"]


def _printed_rows(stdout: str) -> list[list[str]]:
    """The printed table cut at the columns its dashed rule marks."""
    lines = stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("----------  "))
    assert lines[rule - 1].split() == " ".join(TITLES).split()
    spans, pos = [], 0
    for dashes in lines[rule].split("  "):
        spans.append((pos, pos + len(dashes)))
        pos += len(dashes) + 2
    rows = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in spans[:-1]] + [line[spans[-1][0] :].strip()]
        rows.append(cells)
    return rows


def test_cpu_mode_prints_one_table_of_finite_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--json", str(out)], timeout=300)
    data = json.loads(out.read_text())
    assert data["columns"] == COLUMNS and data["failed"] == 0
    rows = data["rows"]
    assert all(list(r) == COLUMNS for r in rows)
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    assert [r["check"] for r in by_kind["header"]] == ["device", "driver", "torch", "MFU peak"]
    assert by_kind["header"][0]["note"].startswith("cpu")
    assert [r["check"] for r in by_kind["throughput"]] == [
        "cnn fp32 hand loop", "cnn fp32 dist_train", "resnet18 32px fp32 hand loop", "resnet18 32px fp32 dist_train"]
    assert [r["check"] for r in by_kind["checkpoint"]] == [f"resnet18+adam {m} save blocks the loop" for m in ("sync", "async")]
    assert len(by_kind["data wait"]) == 2
    tests = {r["check"]: r["status"] for r in by_kind["test"]}
    assert "fsdp2 bf16" not in tests  # the FSDP2 strategy exists: its gpu tests replaced the "not built" row
    assert [name for name in tests if "fsdp2" in name] == [
        *(f"test_gpu::test_fsdp2_mixed_precision_trains_on_cuda_and_checkpoints_fp32[{p}]" for p in ("bf16", "fp16")),
        "test_gpu::test_fsdp2_with_async_save_on_one_gpu_resumes_bitwise", "test_gpu::test_fsdp2_cpu_offload_trains_past_its_first_logged_step",
    ]
    assert len(tests) >= 15 and set(tests.values()) == {"skip"}, tests  # no CUDA here
    for r in by_kind["throughput"]:
        assert all(r[k] > 0 for k in ("samples_per_s", "vs_hand", "mfu_pct", "peak_mem_mb", "seconds")), r
    for r in by_kind["checkpoint"]:
        assert r["seconds"] > 0
    for r in by_kind["data wait"]:
        assert 0 <= r["data_wait_pct"] <= 100
    numbers = [r[k] for r in rows for k in COLUMNS[3:-1] if r[k] is not None]
    assert numbers and all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers)

    # The printed table holds the same rows, every number cell finite.
    printed = _printed_rows(result.stdout)
    assert [cells[1] for cells in printed] == [r["check"] for r in rows]
    for cells in printed:
        for cell in cells[3:-1]:
            assert cell == "-" or math.isfinite(float(cell)), cells
