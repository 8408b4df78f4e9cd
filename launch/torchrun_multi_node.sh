#!/usr/bin/env bash
# Several machines through torchrun with c10d rendezvous: run this same command on every node.
#
# Usage:   NNODES=2 RDZV_ENDPOINT=host0:29400 launch/torchrun_multi_node.sh NPROC CONFIG [section.key=value ...]
# Example: NNODES=2 RDZV_ENDPOINT=10.0.0.1:29400 launch/torchrun_multi_node.sh 1 configs/cnn_digits.yaml
#          -> global batch 64 = micro batch 32 x 2 ranks x 1 accumulation step
# RDZV_ENDPOINT is one node's address and a free port, the same on all nodes; RDZV_ID names the job (the same
# on all nodes, different for concurrent jobs). c10d numbers nodes in arrival order: NODE_RANK is passed
# along but not honoured, and nothing in dist_train depends on it (global rank 0 writes checkpoints).
# Restarts (MAX_RESTARTS=K) need periodic checkpoints: add checkpoint.interval_steps=N.
set -euo pipefail
NPROC=${1:?usage: NNODES=M RDZV_ENDPOINT=HOST:PORT $0 NPROC CONFIG [overrides]}
shift
exec "${PYTHON:-python3}" -m dist_train launch --nproc-per-node "$NPROC" --nnodes "${NNODES:?set NNODES}" \
  --node-rank "${NODE_RANK:-0}" --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=HOST:PORT}" \
  --rdzv-id "${RDZV_ID:-dist_train}" --max-restarts "${MAX_RESTARTS:-0}" ${DRY_RUN:+--dry-run} "$@"
