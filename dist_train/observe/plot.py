"""Loss, learning rate and eval metrics against optimizer steps, from runs' metrics.jsonl, as one PNG.

`dist-train plot RUN_DIR [RUN_DIR ...] --out FILE` draws several runs side by side (one line per run in
each panel); a run writes OUTPUT_DIR/curves.png for itself at its end. Works on a run in progress: it
reads what the history holds so far.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from .tracking import METRICS_FILE, read_history

PLOT_FILE = "curves.png"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _panels(histories: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """(metric key, title) of the panels to draw: loss and LR always, then every eval scalar some run logged."""
    keys = {k for rows in histories.values() for row in rows for k in row}
    panels = [("train/loss", "train loss"), ("train/lr", "learning rate")]
    for key in ("eval/accuracy", "eval/loss", "eval/mse"):
        if key in keys:
            panels.append((key, key.replace("/", " ")))
    panels += [(k, k.replace("/", " ")) for k in sorted(keys) if k.startswith("eval/") and k not in dict(panels) and k != "eval/samples"]
    return panels


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed (a cluster node has none)
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'dist_train[plot]' (or matplotlib)") from None
    histories: dict[str, list[dict]] = {}
    for run in run_dirs:
        path = Path(run)
        rows = read_history(path)
        if not rows:
            from ..config import ConfigError

            raise ConfigError(f"{path} has no metrics history ({path / METRICS_FILE if path.is_dir() else path} is missing or empty); give a dist_train output_dir")
        label = path.resolve().name if path.is_dir() else path.resolve().parent.name
        while label in histories:
            label += "'"
        histories[label] = rows
    panels = _panels(histories)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for label, rows in histories.items():
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if key == "train/loss":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def write_run_plot(output_dir: str | Path) -> Optional[Path]:
    """OUTPUT_DIR/curves.png at the end of a run; a missing matplotlib is one warning line, not an error."""
    try:
        return plot_runs([output_dir], Path(output_dir) / PLOT_FILE)
    except PlotUnavailable as e:
        print(f"dist_train: warning: no {PLOT_FILE}: {e}", flush=True)
    except Exception as e:  # the picture must never fail a finished run
        print(f"dist_train: warning: no {PLOT_FILE}: {type(e).__name__}: {e}", flush=True)
    return None


def plot_command(run_dirs: Sequence[str], out: str) -> int:
    try:
        path = plot_runs(run_dirs, out)
    except PlotUnavailable as e:
        print(f"dist-train: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"wrote {path}: {len(run_dirs)} run(s)", flush=True)
    return 0
