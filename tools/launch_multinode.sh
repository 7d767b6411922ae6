#!/usr/bin/env bash
# Launch pretraining on this node as one of NNODES nodes (run the same line on every node).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS=8 tools/launch_multinode.sh configs/demo.yaml data.shards=/data/x
# Under SLURM: srun --nodes=2 --ntasks-per-node=1 env NODE_RANK=\$SLURM_NODEID tools/launch_multinode.sh ...
# MAX_RESTARTS=3: a lost rank restarts every node's ranks (c10d rendezvous at MASTER_ADDR:MASTER_PORT),
# which resume from the last checkpoint.
set -euo pipefail
config=${1:?usage: launch_multinode.sh CONFIG [key=value ...]}; shift
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
if [[ -z "${GPUS:-}" ]]; then
  GPUS=$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
rendezvous=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
if (( ${MAX_RESTARTS:-0} > 0 )); then
  rendezvous=(--max-restarts="$MAX_RESTARTS" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
              --rdzv-id="${RDZV_ID:-audioclr}")
fi
# torchrun's agent with audioclr's exit codes (2 bad config, 1 error, 130/143 stopped and saved)
exec python3 -m trainer.cli.launch --nnodes="$NNODES" --nproc-per-node="$GPUS" "${rendezvous[@]}" \
  pretrain --config "$config" "$@"
