#!/bin/bash
# Orca-2-13B on 4 nodes x 8 A100-80GB, as in the paper. Submit from the repository root:
#   sbatch configs/slurm-orca2-13b.sh
# One SLURM task per node; each task runs torchrun, which starts the 8 ranks of its node and meets the other nodes
# at a c10d rendezvous on the first node. HSDP (dp_replicate=4) keeps parameter sharding inside a node, so the only
# cross-node traffic is one gradient all-reduce per step.
#
# Preemptible, and longer than one allocation: 10 minutes before the time limit SLURM sends SIGUSR1 to this script
# (B:), which forwards SIGTERM to the job step. torchrun passes it to its ranks; they finish the optimizer step (or the
# checkpoint save or export in progress), write a checkpoint and exit with code 75, and torchrun waits up to
# --shutdown-timeout seconds for that before it kills them (its default, 30 s, is too short to save 13B parameters and
# their AdamW states). Then the script requeues itself: the same job id runs this same command again, which resumes
# from that checkpoint, on however many nodes the new allocation has (change --nodes and dp_replicate together).
# A run that ends any other way (finished, a user error, a crash) is not requeued.
#SBATCH --job-name=orca2-13b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
mkdir -p logs
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
preempted=0
# scancel --signal only signals (it cancels nothing); without --batch/--full it skips this script itself.
trap 'preempted=1; echo "SIGUSR1: time limit near, checkpointing"; scancel --signal=TERM "$SLURM_JOB_ID"' USR1

# In the background: bash runs a trap only between commands, or while it waits.
srun torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node=8 \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:29500" --rdzv_id="$SLURM_JOB_ID" \
    --shutdown-timeout=540 \
    train.py --config=configs/orca2-13b.json --dp_replicate="$SLURM_NNODES" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # the trap ended the first wait early: wait for the checkpoint
    status=0
    wait "$srun_pid" || status=$?
done

if [ "$preempted" = 1 ]; then
    echo "preempted: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
