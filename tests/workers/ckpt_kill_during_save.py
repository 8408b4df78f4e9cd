"""`dist-train train` whose rank KILL_RANK is killed with SIGKILL during save number KILL_AT_SAVE, right
after its DCP shard file is on disk and before the save completes (as a node loss would).

usage: ckpt_kill_during_save.py KILL_RANK KILL_AT_SAVE CONFIG [overrides ...]
"""

import os
import signal
import sys

from torch.distributed.checkpoint import FileSystemWriter

from dist_train import cli

kill_rank, kill_at_save = int(sys.argv[1]), int(sys.argv[2])
saves = {"count": 0}
original_write_data = FileSystemWriter.write_data


def write_data_then_die(self, plan, planner):
    saves["count"] += 1
    future = original_write_data(self, plan, planner)
    if saves["count"] == kill_at_save and int(os.environ["RANK"]) == kill_rank:
        future.wait()  # this rank's shard is written...
        os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies before the save is complete
    return future


FileSystemWriter.write_data = write_data_then_die
sys.exit(cli.main(["train", *sys.argv[3:]]))
