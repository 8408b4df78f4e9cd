"""Two ranks agree on a stop request through signals.StopAgreement, paced as the trainer paces it.

Rank 1 asks to stop at boundary 3. With the pace of 10 ms steps and a 0.5 s poll the flag crosses the network
every 50 boundaries, so both ranks must see the agreed stop at the same boundary, 100 (the poll at 50
carries the request, the poll at 100 reads it), and not before. Prints one line per rank.

usage: stop_agreement_pace.py
"""

import torch.distributed as dist

from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.supervise.signals import StopAgreement


def main() -> None:
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 20)
    try:
        agreement = StopAgreement(groups.control, poll_seconds=0.5)
        agreement.pace(0.01)  # what the trainer tells it at a log step: the slowest rank's seconds per step
        requested = False
        agreed_at = None
        for boundary in range(1, 131):
            requested = requested or (dist_env.global_rank == 1 and boundary == 3)
            if agreement.step(requested) and agreed_at is None:
                agreed_at = boundary
        agreement.close()
        every = agreement.every
        agreed = [None] * dist_env.world_size
        dist.all_gather_object(agreed, agreed_at)
        print(f"rank {dist_env.global_rank}: every={every} agreed_at={agreed}", flush=True)
    finally:
        groups.teardown()


if __name__ == "__main__":
    main()
