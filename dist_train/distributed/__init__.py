"""Where a process stands in the job and what it talks through.

  environment.py  the launch facts: which launcher started this process, its rank, node and device, as one
                  frozen DistEnv built once by declarative detectors (a new launcher is one detector class)
  groups.py       the only module that creates or destroys torch.distributed process groups: the default
                  group, the side groups (control, checkpoint), the device binding, what DeepSpeed is told
"""
