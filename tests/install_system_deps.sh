#!/usr/bin/env bash
# Installs what the tests need beyond Python packages. Idempotent; needs root (CI and dev machines are).
set -euo pipefail
need=()
command -v g++ >/dev/null || need+=(g++)          # DeepSpeed JIT-builds a small CPU op
# A real Slurm cluster on two emulated hosts for tests/test_slurm.py (started and stopped by the tests, never by systemd).
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
# Open MPI's mpirun for tests/test_engines.py (a real `mpirun -np 2` run; dist_train itself needs no MPI library).
command -v mpirun >/dev/null || need+=(openmpi-bin)
# strace for tests/test_groups.py (which files a save fsyncs) and the per-node read counts of the emulated cluster.
command -v strace >/dev/null || need+=(strace)
# The emulated cluster (tests/cluster.py): network namespaces and a bridge (iproute2's ip), mount/UTS/PID
# namespaces (util-linux's unshare, nsenter, mount).
command -v ip >/dev/null || need+=(iproute2)
{ command -v unshare && command -v nsenter && command -v mount; } >/dev/null || need+=(util-linux mount)
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then echo "install as root: ${need[*]}" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
