"""`dist-train` / `python -m dist_train`: argument parsing only; the work happens in the modules it calls.

  dist-train train CONFIG [section.key=value ...]       train (plain, torchrun, accelerate, srun, mpirun, Kubeflow, SkyPilot)
  dist-train eval checkpoint=PATH [CONFIG] [overrides]  evaluate a checkpoint, model.pt or exported file
  dist-train export CHECKPOINT --out model.pt           plain state_dict for the tutorial model
  dist-train verify-resume CHECKPOINT --nproc-per-node N [--strategy S]   prove a resume there (verify_resume.py)
  dist-train data prepare --source NAME --out DIR       write webdataset shards + manifest
  dist-train data index SHARDS --out DIR               index webdataset shards dist_train did not write (tars untouched)
  dist-train data inspect DIR                           summarise a manifest, verify checksums
  dist-train launch --nproc-per-node N CONFIG [...]     build and run the torchrun command
  dist-train plot RUN_DIR [RUN_DIR ...] --out FILE      loss, LR and eval curves of runs as one PNG
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

from .config import describe_keys

from .errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, classify  # noqa: F401 (the codes' one home is errors.py)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML preset, e.g. configs/cnn_digits.yaml")
    # default=[]: without it argparse names an optional nargs="*" positional among the missing "required" ones.
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides, e.g. train.epochs=3 optim.lr=0.1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-train",
        description="Train tutorial-sized PyTorch models on 1..N processes with DDP or DeepSpeed ZeRO.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys (set any with section.key=value):\n" + "\n".join(describe_keys()),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model from a YAML preset", description="Train. Runs unchanged under torchrun, accelerate launch, srun, mpirun, Kubeflow and SkyPilot (see the README's launcher table).")
    _add_config_args(train)

    evaluate = sub.add_parser(
        "eval",
        help="evaluate a checkpoint, model.pt or an exported file",
        description="dist-train eval checkpoint=PATH [CONFIG] [overrides]. A checkpoint (step-N directory or output_dir) brings "
        "its own model, strategy and world size (meta.json) and evaluates on any number of processes; CONFIG, if given, "
        "supplies the data section. model.pt or an exported file needs CONFIG (or a config.yaml beside it).",
    )
    evaluate.add_argument("args", nargs="*", metavar="checkpoint=PATH | CONFIG | section.key=value")

    plot = sub.add_parser("plot", help="draw runs' loss, LR and eval curves into one PNG", description="Reads each RUN_DIR's metrics.jsonl (a run in progress too) and draws the runs side by side.")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", required=True, help="PNG file to write")

    export = sub.add_parser("export", help="write a plain state_dict from a checkpoint", description="Turn a dist_train checkpoint (DCP or DeepSpeed) into the tutorial's plain state_dict.")
    export.add_argument("checkpoint", help="a step-N checkpoint directory, or an output_dir (its newest checkpoint)")
    export.add_argument("--out", required=True, help="file to write, e.g. model.pt")
    export.add_argument(
        "--tutorial-dict",
        metavar="PATH",
        help="also write the tutorial's checkpoint dict (epoch, model_state_dict, optimizer_state_dict, loss: the last logged train loss); "
        "the optimizer state's lr is the run's optim.lr (its peak), not the schedule's last value, since the tutorial's loop continues at a constant LR",
    )

    from .verify_resume import add_parser as add_verify_resume

    add_verify_resume(sub)

    data = sub.add_parser("data", help="prepare and inspect webdataset shards")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    prepare = data_sub.add_parser("prepare", help="write a data source as webdataset shards with a manifest")
    prepare.add_argument("--source", required=True, help="digits | synthetic_linear | random | fashion_mnist | mnist | cifar10 | image_folder")
    prepare.add_argument("--root", help="dataset root for on-disk sources")
    prepare.add_argument("--out", required=True, help="output directory (DIR/train, DIR/test)")
    prepare.add_argument("--samples-per-shard", type=int, default=256, help="samples per tar shard")
    prepare.add_argument("--image-size", type=int, help="resize images to this height/width before writing")
    prepare.add_argument("--download", action="store_true", help="download torchvision sets when missing (needs network)")
    prepare.add_argument("--samples-per-record", type=int, default=256, help="samples per tar member group (one .npy each); many per member is what makes reading fast")
    prepare.add_argument("--shuffle-seed", type=int, default=0, help="samples are shuffled with this seed before they are cut into shards (recorded in the manifest), so every shard mixes classes even when the source is sorted by class")
    prepare.add_argument("--no-shuffle", action="store_true", help="write samples in the source's order")
    prepare.add_argument("--overwrite", action="store_true", help="write again even if DIR already holds shards prepared with the same options")
    index = data_sub.add_parser(
        "index", help="index webdataset shards written by other tools, to train on them as they are",
        description="Writes OUT/train/manifest.json and OUT/test/manifest.json (with members tables beside them) for webdataset "
        "shards that dist_train did not write; the tars are only read. Train with data.source=shards data.path=OUT.",
    )
    index.add_argument("shards", nargs="+", metavar="SHARDS", help="folders of .tar/.tar.gz shards (and their train/ test/ val/ sub-folders), tar paths, brace patterns, http(s):// URLs or pipe: commands")
    index.add_argument("--out", required=True, help="folder for the index (never inside the tars; may be a new folder anywhere)")
    index.add_argument("--split", choices=("auto", "train", "test"), default="auto", help="auto: by name (train*, test*/val*/eval*/dev*, or such a folder); else every shard given belongs to this split")
    index.add_argument("--input", help="the member that is the input (default: the first of jpg jpeg png webp ppm pgm npy in the first sample)")
    index.add_argument("--target", help="the member holding the label, EXT or EXT:KEY for a json key (default: cls, label, target, class, or a json member's label)")
    inspect = data_sub.add_parser("inspect", help="print a shard directory's manifest summary and verify checksums")
    inspect.add_argument("path", help="shard directory (with manifest.json) or its parent; an index, or a folder of webdataset tars")

    launch = sub.add_parser("launch", help="build and run a torchrun command", description="A thin torchrun wrapper: single- or multi-node with c10d rendezvous.")
    launch.add_argument("--nproc-per-node", type=int, default=1)
    launch.add_argument("--nnodes", default="1")
    launch.add_argument("--node-rank", type=int, default=0)
    launch.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node)")
    launch.add_argument("--rdzv-id", default=None, help="job id shared by all nodes")
    launch.add_argument("--max-restarts", type=int, default=0, help="elastic restarts; each restart resumes from the newest checkpoint")
    launch.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    _add_config_args(launch)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # `verify-resume CHECKPOINT --nproc-per-node 2 key=value`: argparse ends a nargs='*' positional at the first option.
        if getattr(args, "overrides", None) is None or any("=" not in u or u.startswith("-") for u in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *unknown]
    # The console script does not put the current directory on sys.path (python -m does): a model given as
    # model.name=mymodels:Net next to the user's config must import the same way under both.
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        return _dispatch(args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # user-facing errors carry their own clear message (DCP's CheckpointException is a BaseException)
        code = report_error(e)
        if code is None:
            raise
        return code


def report_error(error: BaseException) -> Optional[int]:
    """Say a user-facing error (errors.classify) in one line; its exit code, or None for an unexpected one
    (whose traceback then shows). The CLI and the Python API (`dist_train.train`) end on it alike."""
    classified = classify(error)
    if classified is None:
        return None
    kind, message, code = classified
    if kind in ("config error", "launch error"):
        return _said_once(kind, message, code)
    # Data, checkpoint and storage errors may be one rank's own: every rank that has one says so.
    rank = _global_rank()
    print(f"dist-train: {kind}{f' (rank {rank})' if rank else ''}: {message}", file=sys.stderr, flush=True)
    return code


# How long the other processes wait before exiting with an error only the main process prints: a launcher
# (torchrun, srun) stops every process once one exits non-zero, and a loaded machine can bring the main
# process to the same error a moment later than the rest (seen in CI: its line was lost).
SAY_ONCE_GRACE_SECONDS = 5.0


def _said_once(kind: str, message: str, code: int) -> int:
    """An error every process meets alike (config, launch): the main process says it in one line."""
    if _is_main_process():
        print(f"dist-train: {kind}: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(SAY_ONCE_GRACE_SECONDS)
    return code


def console_main() -> None:
    """`dist-train` and `python -m dist_train`: main(), then leave without the interpreter's finalization.

    Everything dist_train owns is closed by then (trackers finished, checkpoints waited for, the process
    group destroyed, the watchdog joined). Finalization would only destroy leftover native objects in
    arbitrary order, and that is where the rare "terminate called without an active exception" abort
    (SIGABRT) of finished torchrun workers happened: the aborting thread had no Python frame left."""
    status = main()
    logging.shutdown()  # flush and close every log file handler: os._exit skips it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _global_rank() -> int:
    from .distributed.environment import detect_environment

    try:
        return detect_environment().global_rank
    except Exception:  # an inconsistent launch: let every process speak
        return 0


def _is_main_process() -> bool:
    return _global_rank() == 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .run import train

        return train(args.config, args.overrides)
    if args.command == "eval":
        from .run import evaluate, split_eval_args

        return evaluate(*split_eval_args(args.args))
    if args.command == "plot":
        from .observe.plot import plot_command

        return plot_command(args.runs, args.out)
    if args.command == "export":
        from .export import export_checkpoint

        return export_checkpoint(args.checkpoint, args.out, args.tutorial_dict)
    if args.command == "verify-resume":
        from .verify_resume import verify_resume_command

        return verify_resume_command(args)
    if args.command == "data":
        from .data import index, shards

        if args.data_command == "prepare":
            return shards.prepare_command(args)
        if args.data_command == "index":
            return index.index_command(args)
        if index.is_foreign(args.path):
            return index.inspect_command(args)
        return shards.inspect_command(args)
    if args.command == "launch":
        from .launch import launch_command

        return launch_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
