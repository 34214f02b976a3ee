#!/usr/bin/env bash
# Runs one cbs stage: the launch layer under jobs/*.sbatch (which hold the resources). Works inside a Slurm
# job or by hand.
#
#   jobs/run_stage.sh preprocess CONFIG [--set key=value ...] [--force]
#   jobs/run_stage.sh pretrain CONFIG [--set key=value ...]
#   jobs/run_stage.sh evaluate RUN_DIR [...]
#   jobs/run_stage.sh fit STUDY_DIR --out OUT_DIR [...]
#
# pretrain with more than one process in all (GPUS_PER_NODE x NNODES > 1, GPUS_PER_NODE > 0) starts one rank
# per GPU: with the deepspeed launcher (a hostfile from the job's node list, `slots=GPUS_PER_NODE`; on several
# nodes `srun` starts one launcher per node with --no_ssh, so no ssh between nodes is needed), or with
# LAUNCHER=torchrun (srun + torchrun, c10d rendezvous on the first node). Otherwise, and for every other
# stage, it is one plain `python -m pipeline.cli STAGE ...`. The config travels as a path, never inline.
#
# Environment (all optional):
#   CBS_PYTHON     python with cbs installed      (default: <repo>/.venv/bin/python)
#   GPUS_PER_NODE  ranks per node                 (default: $SLURM_GPUS_ON_NODE, else 0 = one CPU process)
#   NNODES         nodes                          (default: $SLURM_JOB_NUM_NODES, else 1)
#   LAUNCHER       deepspeed | torchrun           (default: deepspeed)
#   MASTER_ADDR    rendezvous host                (default: the job's first node)
#   MASTER_PORT    rendezvous port                (default: 29500)
#   DS_ACCELERATOR set to cpu when there is no GPU (no working nvidia-smi), unless already set
set -euo pipefail

die() { echo "run_stage: error: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${CBS_PYTHON:-$REPO/.venv/bin/python}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
LAUNCHER=${LAUNCHER:-deepspeed}
MASTER_PORT=${MASTER_PORT:-29500}

(($# >= 1)) || die "usage: $0 {preprocess|pretrain|evaluate|fit} ARGS..."
STAGE=$1
shift
[[ -x $PYTHON ]] || die "no python at $PYTHON: run \`make setup\` in $REPO, or set CBS_PYTHON"
[[ $GPUS_PER_NODE =~ ^[0-9]+$ && $NNODES =~ ^[1-9][0-9]*$ ]] \
  || die "GPUS_PER_NODE must be >= 0 and NNODES >= 1: got GPUS_PER_NODE=$GPUS_PER_NODE NNODES=$NNODES"
if ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
# the checkout wins over whatever cbs the python may have installed
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# torch starts a thread per core of the machine, not of the job (without Slurm's task/affinity plugins nothing
# binds it): jobs sharing a node would oversubscribe it, so give each rank its share of the job's CPUs
if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
  ranks_here=1
  [[ $STAGE == pretrain ]] && ((GPUS_PER_NODE > 1)) && ranks_here=$GPUS_PER_NODE
  threads=$((SLURM_CPUS_ON_NODE / ranks_here))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
fi

echo "run_stage: $STAGE $* | host $(hostname -s) job ${SLURM_JOB_ID:-none}" \
  "${SLURM_ARRAY_TASK_ID:+task $SLURM_ARRAY_TASK_ID }| nodes $NNODES x gpus $GPUS_PER_NODE | $(date -u +%FT%TZ)" >&2

if [[ $STAGE != pretrain ]] || ((GPUS_PER_NODE == 0 || GPUS_PER_NODE * NNODES == 1)); then
  exec "$PYTHON" -m pipeline.cli "$STAGE" "$@"
fi

# ---- pretrain over several processes -------------------------------------------------------------------------
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  HOSTS=("$(hostname -s)")
fi
((${#HOSTS[@]} >= NNODES)) || die "NNODES=$NNODES but the job has ${#HOSTS[@]} node(s): ${HOSTS[*]}"
HOSTS=("${HOSTS[@]:0:NNODES}")
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
((NNODES == 1)) || [[ -n ${SLURM_JOB_ID:-} ]] || die "NNODES=$NNODES needs a Slurm allocation (srun starts the nodes)"

# one launcher per node; since Slurm 22.05 srun no longer inherits the job's --cpus-per-task: pass it on
SRUN=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
  ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"})

case $LAUNCHER in
  torchrun)
    cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
      --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${SLURM_JOB_ID:-cbs}"
      -m pipeline.cli pretrain "$@")
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
      exec "${SRUN[@]}" "${cmd[@]}"
    fi
    exec "${cmd[@]}"
    ;;
  deepspeed)
    if ((NNODES > 1)) && [[ -z ${CBS_NODE_RANK:-} ]]; then
      # one launcher per node: this script again, under srun, with the node's rank
      # shellcheck disable=SC2016  # $SLURM_NODEID and "$@" are for the bash that srun starts on each node
      exec "${SRUN[@]}" bash -c 'CBS_NODE_RANK=$SLURM_NODEID exec "$0" pretrain "$@"' "${BASH_SOURCE[0]}" "$@"
    fi
    NODE_RANK=${CBS_NODE_RANK:-0}
    # DeepSpeed gives a node's ranks the GPU ids of its hostfile slots and overwrites CUDA_VISIBLE_DEVICES with
    # them. Where Slurm gave this node other GPUs (e.g. 4,5 without a device cgroup), list slots up to the
    # highest one and --include exactly those; the other nodes' entries only count ranks here.
    own_ids=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
    own_slots=$GPUS_PER_NODE
    if [[ ${CUDA_VISIBLE_DEVICES:-} =~ ^[0-9]+(,[0-9]+)*$ ]]; then
      IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
      ((${#visible[@]} == GPUS_PER_NODE)) \
        || die "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES holds ${#visible[@]} GPUs, GPUS_PER_NODE=$GPUS_PER_NODE"
      own_ids=$CUDA_VISIBLE_DEVICES
      own_slots=$(($(printf '%s\n' "${visible[@]}" | sort -n | tail -n 1) + 1))
    fi
    # node-local and removed at exit: the job writes nothing but its log
    HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/cbs-hostfile.XXXXXX")
    trap 'rm -f "$HOSTFILE"' EXIT
    include=""
    for i in "${!HOSTS[@]}"; do
      if ((i == NODE_RANK)); then
        echo "${HOSTS[i]} slots=$own_slots"
        include+="${include:+@}${HOSTS[i]}:$own_ids"
      else
        echo "${HOSTS[i]} slots=$GPUS_PER_NODE"
        include+="${include:+@}${HOSTS[i]}:$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
      fi
    done >"$HOSTFILE"
    # --no_ssh: each node's launcher starts only its own ranks (DeepSpeed would otherwise ssh-check the hosts).
    # --no_local_rank: the rank is in LOCAL_RANK; the flag would land before the stage (cli --local_rank=0 pretrain)
    "$PYTHON" -m deepspeed.launcher.runner --hostfile="$HOSTFILE" --include="$include" --no_ssh \
      --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --no_local_rank \
      --module pipeline.cli pretrain "$@"
    ;;
  *) die "LAUNCHER must be deepspeed or torchrun: got '$LAUNCHER'" ;;
esac
