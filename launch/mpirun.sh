#!/usr/bin/env bash
# Open MPI's mpirun starts the processes; dist_train reads each one's OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}.
#
# Usage:   launch/mpirun.sh NPROC CONFIG [section.key=value ...]
# Example: launch/mpirun.sh 2 configs/cnn_digits.yaml
#          -> global batch 64 = micro batch 32 x 2 ranks x 1 accumulation step
# Several machines: HOSTFILE=hosts MASTER_ADDR=node1 launch/mpirun.sh 8 CONFIG   (hosts: "node1 slots=4" per line)
#          MPI has no rendezvous address to give: MASTER_ADDR (rank 0's machine, the first in the hostfile) is
#          passed to every rank; on one machine it is not needed. The port is MASTER_PORT if set, otherwise
#          derived from the MPI job id, so concurrent jobs on a node do not collide.
# Extra mpirun flags go in MPIRUN_ARGS, e.g. MPIRUN_ARGS="--allow-run-as-root" in a container.
# --bind-to none: Open MPI pins each rank to one core by default, which starves DataLoader workers and threads.
# MPICH / Intel MPI: mpiexec -n NPROC -genv MASTER_ADDR node1 python -m dist_train train CONFIG (PMI_RANK/PMI_SIZE).
set -euo pipefail
NPROC=${1:?usage: $0 NPROC CONFIG [overrides]}
shift
exec mpirun -np "$NPROC" --bind-to none ${HOSTFILE:+--hostfile "$HOSTFILE"} \
  ${MASTER_ADDR:+-x MASTER_ADDR} ${MASTER_PORT:+-x MASTER_PORT} ${MPIRUN_ARGS:-} \
  "${PYTHON:-python3}" -m dist_train train "$@"
