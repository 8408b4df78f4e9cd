#!/usr/bin/env bash
# The same trainer under `accelerate launch`, with one of the accelerate configs in configs/accelerate/.
#
# Usage:   launch/accelerate.sh ACCELERATE_CONFIG CONFIG [section.key=value ...]
# Example: launch/accelerate.sh configs/accelerate/ddp.yaml configs/cnn_digits.yaml
#          launch/accelerate.sh configs/accelerate/deepspeed_zero2.yaml configs/cnn_digits.yaml
#          -> global batch 64 = micro batch 32 x 2 processes x 1 accumulation step
# What the accelerate config sets (processes, mixed precision, DeepSpeed and its ZeRO stage, accumulation,
# clipping) is honoured; a dist_train key set to something else stops the run with both values named.
set -euo pipefail
ACCELERATE_CONFIG=${1:?usage: $0 ACCELERATE_CONFIG CONFIG [overrides]}
shift
exec "${PYTHON:-python3}" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" -m dist_train train "$@"
