#!/usr/bin/env bash
# Container entrypoint: maps common cluster schedulers' variables onto torchrun's, then
# runs the command given (torchrun ..., audioclr ..., pytest ...).
set -euo pipefail
if [[ -n "${SLURM_NNODES:-}" && -z "${NNODES:-}" ]]; then
  export NNODES="$SLURM_NNODES" NODE_RANK="${SLURM_NODEID:-0}"
fi
exec "$@"
