#!/usr/bin/env bash
# Installs what the tests need beyond Python packages. Idempotent; needs root (CI and dev machines are).
set -euo pipefail
need=()
command -v g++ >/dev/null || need+=(g++)          # DeepSpeed JIT-builds a small CPU op
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then echo "install as root: ${need[*]}" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
