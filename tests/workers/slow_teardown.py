"""`dist-train train ...` with rank 1 slow to close its trainer (3 s), as a loaded node is: rank 0 reaches the
end of the run first and, where it hosts the rendezvous store (mpirun, Slurm), takes the store with it when
it exits."""

from __future__ import annotations

import os
import sys
import time

from dist_train import trainer as trainer_module
from dist_train.cli import main

if "1" in (os.environ.get("RANK"), os.environ.get("OMPI_COMM_WORLD_RANK")):
    close = trainer_module.Trainer.close

    def slow_close(self: trainer_module.Trainer) -> None:
        close(self)
        time.sleep(3.0)

    trainer_module.Trainer.close = slow_close  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
