#!/usr/bin/env bash
# One machine, N processes, through torchrun (standalone rendezvous on a free local port).
#
# Usage:   launch/torchrun_single_node.sh NPROC CONFIG [section.key=value ...]
# Example: launch/torchrun_single_node.sh 2 configs/cnn_digits.yaml
#          -> global batch 64 = micro batch 32 x 2 ranks x 1 accumulation step
# Restarts: MAX_RESTARTS=1 launch/torchrun_single_node.sh 2 CONFIG checkpoint.interval_steps=10
#          (a failed rank restarts all of them from the newest checkpoint)
# Add --dry-run via DRY_RUN=1 to print the torchrun command instead of running it.
set -euo pipefail
NPROC=${1:?usage: $0 NPROC CONFIG [overrides]}
shift
exec "${PYTHON:-python3}" -m dist_train launch --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-0}" \
  ${DRY_RUN:+--dry-run} "$@"
