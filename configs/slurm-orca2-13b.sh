#!/bin/bash
# Orca-2-13B on 4 nodes x 8 A100-80GB, as in the paper. Submit from the repository root:
#   sbatch configs/slurm-orca2-13b.sh
# One SLURM task per node; each task runs torchrun, which starts the 8 ranks of its node and meets the other nodes
# at a c10d rendezvous on the first node. HSDP (dp_replicate=4) keeps parameter sharding inside a node, so the only
# cross-node traffic is one gradient all-reduce per step. Resubmitting the same script resumes from the latest
# checkpoint in out_dir, on however many nodes the new allocation has (change --nodes and dp_replicate together).
#SBATCH --job-name=orca2-13b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
mkdir -p logs
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node=8 \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:29500" --rdzv_id="$SLURM_JOB_ID" \
    train.py --config=configs/orca2-13b.json --dp_replicate="$SLURM_NNODES"
