"""What a run shows and records: the console and per-rank logs (runlog.py), metrics.jsonl and the trackers
(tracking.py: W&B, TensorBoard, each behind one Tracker interface), W&B's offline files read back
(wandb_offline.py) and the curves picture (plot.py). Nothing here decides anything about training."""
