#!/usr/bin/env bash
# Runs one cbs stage: the launch layer under jobs/*.sbatch (which hold the resources). Works inside a Slurm
# job or by hand.
#
#   jobs/run_stage.sh preprocess CONFIG [--set key=value ...] [--force]
#   jobs/run_stage.sh pretrain CONFIG [--set key=value ...]
#   jobs/run_stage.sh evaluate RUN_DIR [...]
#   jobs/run_stage.sh fit STUDY_DIR --out OUT_DIR [...]
#
# Launch. pretrain with more than one process in all (GPUS_PER_NODE x NNODES > 1, GPUS_PER_NODE > 0) starts one
# rank per GPU: with the deepspeed launcher (a hostfile from the job's node list, `slots=GPUS_PER_NODE`), or with
# LAUNCHER=torchrun (c10d rendezvous on the first node). On several nodes `srun` runs this script once per node
# with CBS_NODE_RANK set, and each starts its node's ranks: the deepspeed launcher with --no_ssh --node_rank (no
# ssh between nodes), or torchrun --nnodes. Otherwise it is one plain `python -m cbs.pipeline.cli pretrain ...`; every
# other stage is one plain process too. The config travels as a path, never inline.
#
# Stopping (pretrain). SIGUSR1 (jobs/pretrain.sbatch asks Slurm for it before the time limit), SIGTERM (scancel,
# a node going down) and SIGINT (Ctrl-C) stop a run cleanly: every rank finishes its step, saves a checkpoint and
# exits 75, and so does this script. The launch runs in its own session, so a signal reaches the ranks only
# through this script, once: it passes the first one on as SIGUSR1 to the ranks as soon as they handle it (they
# install the handler when training starts; before that SIGUSR1 would kill them). Why not let signals through:
# neither torchrun nor the deepspeed launcher handles SIGUSR1 (they would die and orphan the ranks), and a rank
# that gets a second signal ends at once, without its checkpoint; for that reason too launchers run with SIGTERM
# blocked (see BLOCK_TERM below). Later signals are logged and dropped. With
# CBS_REQUEUE=1 (jobs/pretrain.sbatch sets it) inside a Slurm job, a run that stopped (exit 75) then requeues its
# job (`scontrol requeue`), unless this script got SIGTERM or SIGINT: a scancel, or Slurm's kill at the time
# limit, is never undone by a requeue.
#
# Dry run. CBS_DRY_RUN=1 checks the environment as a real launch does, prints what would run and exits 0,
# starting and writing nothing. One item a line:
#   env NAME=VALUE     a variable this script sets for the launch
#   hostfile LINE      a line of the deepspeed launcher's hostfile (the command names it HOSTFILE_TEMPLATE below)
#   run COMMAND        the command it runs, shell-quoted (bash's printf %q: Python's shlex.split reads it)
#   node N ITEM        on several nodes: what this script, started by srun on the node of rank N, does there
#
# Environment (all optional):
#   CBS_PYTHON     python with cbs installed      (default: <repo>/.venv/bin/python)
#   GPUS_PER_NODE  ranks per node                 (default: $SLURM_GPUS_ON_NODE, else 0 = one CPU process)
#   NNODES         nodes                          (default: $SLURM_JOB_NUM_NODES, else 1)
#   LAUNCHER       deepspeed | torchrun           (default: deepspeed)
#   MASTER_ADDR    rendezvous host                (default: the job's first node)
#   MASTER_PORT    rendezvous port                (default: 29500)
#   CBS_DRY_RUN    1: print the launch, run nothing (default: 0)
#   CBS_REQUEUE    1: requeue the Slurm job when the run stopped on SIGUSR1 (default: 0)
#   DS_ACCELERATOR set to cpu when there is no GPU (no working nvidia-smi), unless already set
# Node names come from `scontrol show hostnames $SLURM_JOB_NODELIST`; where there is no scontrol (a dry run on a
# machine without Slurm) simple lists are expanded here: `a,b`, `gpu[01-04,07]`.
set -euo pipefail

die() { echo "run_stage: error: $*" >&2; exit 2; }
say() { echo "run_stage: $*" >&2; }

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SELF")")
PYTHON=${CBS_PYTHON:-$REPO/.venv/bin/python}
# A rank's identity is the launcher's to give. One inherited from the submitter (a process that ran pretrain
# in-process keeps LOCAL_RANK=0, and sbatch --export=ALL passes it on) would make the launcher itself look like a
# rank here, and a plain process look like one rank of a larger job.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK NODE_RANK
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
LAUNCHER=${LAUNCHER:-deepspeed}
MASTER_PORT=${MASTER_PORT:-29500}
DRY_RUN=${CBS_DRY_RUN:-0}
HOSTFILE_TEMPLATE=${TMPDIR:-/tmp}/cbs-hostfile.XXXXXX
EXIT_STOPPED=75  # a run that saved a checkpoint and stopped on a signal (cbs.pipeline.pretrain.EXIT_PREEMPTED)

# ---- checks: every one before anything starts ------------------------------------------------------------------
(($# >= 1)) || die "usage: $0 {preprocess|pretrain|evaluate|fit} ARGS..."
STAGE=$1
shift
[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "CBS_DRY_RUN must be 0 or 1: got '$DRY_RUN'"
[[ -x $PYTHON ]] || die "no python at $PYTHON: run \`make setup\` in $REPO, or set CBS_PYTHON"
[[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE must be an integer >= 0 (0: one CPU process): got '$GPUS_PER_NODE'"
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES must be an integer >= 1: got '$NNODES'"
[[ $LAUNCHER == deepspeed || $LAUNCHER == torchrun ]] || die "LAUNCHER must be deepspeed or torchrun: got '$LAUNCHER'"
[[ $MASTER_PORT =~ ^[1-9][0-9]*$ ]] && ((MASTER_PORT <= 65535)) \
  || die "MASTER_PORT must be a port number 1-65535: got '$MASTER_PORT'"
if ((GPUS_PER_NODE > 0)) && [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
  # Slurm sets it to the GPUs it gave the job on this node; more ranks than that would fail one by one at start
  IFS=, read -ra VISIBLE <<<"$CUDA_VISIBLE_DEVICES"
  ((${#VISIBLE[@]} == GPUS_PER_NODE)) || die "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' holds ${#VISIBLE[@]}" \
    "GPU(s) but GPUS_PER_NODE=$GPUS_PER_NODE: set GPUS_PER_NODE to the GPUs of the node (or ask Slurm for" \
    "--gres=gpu:$GPUS_PER_NODE)"
fi

# ---- the environment of the launch -----------------------------------------------------------------------------
LAUNCH_ENV=()
setenv() { export "$1=$2"; LAUNCH_ENV+=("$1=$2"); }
if ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  setenv DS_ACCELERATOR "${DS_ACCELERATOR:-cpu}"
fi
# the checkout wins over whatever cbs the python may have installed
case ${PYTHONPATH:-} in
  "$REPO" | "$REPO":*) ;;
  *) setenv PYTHONPATH "$REPO${PYTHONPATH:+:$PYTHONPATH}" ;;
esac
# torch starts a thread per core of the machine, not of the job (without Slurm's task/affinity plugins nothing
# binds it): jobs sharing a node would oversubscribe it, so give each rank its share of the job's CPUs
if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
  ranks_here=1
  [[ $STAGE == pretrain ]] && ((GPUS_PER_NODE > 1)) && ranks_here=$GPUS_PER_NODE
  threads=$((SLURM_CPUS_ON_NODE / ranks_here))
  setenv OMP_NUM_THREADS "${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}"
fi

DRY_OUT=()  # the dry run's lines, printed at the end: a refused launch prints none
show() {  # KIND ARGS...: one dry-run line; a `run` command is quoted word by word
  local kind=$1 line
  shift
  if [[ $kind == run ]]; then
    printf -v line ' %q' "$@"
    DRY_OUT+=("run$line")
  else
    DRY_OUT+=("$kind $*")
  fi
}
dry_exit() { printf '%s\n' "${DRY_OUT[@]}"; exit 0; }

for kv in "${LAUNCH_ENV[@]}"; do show env "$kv"; done
ARGS=("$@")
announce() {  # the log's first line of a launch (its checks passed)
  echo "run_stage: $STAGE ${ARGS[*]} | host $(hostname -s) job ${SLURM_JOB_ID:-none}" \
    "${SLURM_ARRAY_TASK_ID:+task $SLURM_ARRAY_TASK_ID }${CBS_NODE_RANK:+node $CBS_NODE_RANK }|" \
    "nodes $NNODES x gpus $GPUS_PER_NODE | $(date -u +%FT%TZ)" >&2
}

if [[ $STAGE != pretrain ]]; then
  ((DRY_RUN)) && { show run "$PYTHON" -m cbs.pipeline.cli "$STAGE" "$@"; dry_exit; }
  announce
  exec "$PYTHON" -m cbs.pipeline.cli "$STAGE" "$@"
fi

# ---- stopping: pass the first stop signal on, once -------------------------------------------------------------
STOP_SIGNAL=""   # the first stop signal this script got
KILLED_BY=""     # TERM or INT if one came: the job is being ended, so never requeue it
STOP_PASSED=0    # 1 once a process of the launch got SIGUSR1
LAUNCH_PID=""

on_signal() {
  [[ $1 == USR1 ]] || KILLED_BY=${KILLED_BY:-$1}
  if [[ -n $STOP_SIGNAL ]]; then
    say "SIG$1 as well: dropped (SIG$STOP_SIGNAL is passed on already; kill -9 ends the run without a checkpoint)"
    return 0
  fi
  STOP_SIGNAL=$1
  say "SIG$1: the run saves a checkpoint after its current step and stops"
}

handles_usr1() {  # PID: its caught-signals mask (/proc/PID/status SigCgt, hex) has SIGUSR1 (signal 10: bit 9)
  local key mask
  while read -r key mask; do
    # an explicit status: a bare `return` in a trap handler returns the status from before the trap
    [[ $key == SigCgt: ]] && { (((0x$mask >> 9) & 1)) && return 0; return 1; }
  done 2>/dev/null <"/proc/$1/status"
  return 1
}

children_of() {  # PID: its child pids, from /proc (every thread's children), or pgrep where the kernel lacks that
  local f kids
  if [[ -e /proc/$1/task/$1/children ]]; then
    for f in /proc/"$1"/task/*/children; do
      kids=()
      read -r -a kids 2>/dev/null <"$f" || true
      ((${#kids[@]} == 0)) || echo "${kids[@]}"
    done
  else
    pgrep -P "$1" || true
  fi
  return 0
}

ranks_under() {  # PID: its topmost descendants with LOCAL_RANK in their environment (both launchers set it)
  local child
  for child in $(children_of "$1"); do
    if grep -qz '^LOCAL_RANK=' "/proc/$child/environ" 2>/dev/null; then echo "$child"; else ranks_under "$child"; fi
  done
}

pass_stop() {  # SIGUSR1 to the launch's ranks (STOP_TO=ranks) or to the launch itself; false while none handles it
  local pid candidates=$LAUNCH_PID ready=()
  [[ -n $LAUNCH_PID ]] || return 1
  [[ $STOP_TO == ranks ]] && candidates=$(ranks_under "$LAUNCH_PID")
  for pid in $candidates; do
    if handles_usr1 "$pid"; then ready+=("$pid"); fi
  done
  # one kill for all: the ranks get it within microseconds, before any could finish the run and drop its handler
  ((${#ready[@]} > 0)) && kill -USR1 "${ready[@]}" 2>/dev/null || return 1
  STOP_PASSED=1
  # the ranks that do not handle it yet stop too: a rank's stop flag is all-reduced every step
  say "passed SIG$STOP_SIGNAL on as SIGUSR1 to ${#ready[@]} of $(wc -w <<<"$candidates")" \
    "$([[ $STOP_TO == ranks ]] && echo "rank process(es)" || echo "${LAUNCH_CMD[0]##*/}")"
}

# What a launch runs under. A launcher gets its own session, and SIGTERM blocked (the mask is inherited: the ranks
# have it blocked too). scancel, Slurm's preemption and its kill at the time limit send SIGTERM to every process of
# the job; torchrun and DeepSpeed's launch.py would pass it on to their ranks, whom a second signal ends at once,
# without their checkpoint. Blocked, it reaches the ranks only as this script's one SIGUSR1; they stop and save, and
# the launchers end when their ranks do. (Only SIGKILL ends a rank early now; the launchers send it 30 s after
# SIGTERM.) A lone python keeps SIGTERM: its own handler takes it, and SIGUSR1 from here.
BLOCK_TERM='import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); os.execvp(sys.argv[1], sys.argv[1:])'
prefix() {  # KIND: the words that go before the command
  case $1 in
    python) PREFIX=(setsid) ;;
    ranks) PREFIX=(setsid "$PYTHON" -S -c "$BLOCK_TERM") ;;
    srun) PREFIX=() ;;
  esac
}

launch() {  # KIND CMD...: run CMD, pass a stop on, return the script's exit status. KIND: python (one process, in
  # its own session), ranks (a launcher: the stop goes to its ranks), srun (the stop goes to srun, which passes it to
  # each node's task); a dry run prints the command instead
  local kind=$1 status=0
  shift
  prefix "$kind"
  ((DRY_RUN)) && { show run "${PREFIX[@]}" "$@"; dry_exit; }
  LAUNCH_CMD=("$@")
  STOP_TO=self
  [[ $kind == ranks ]] && STOP_TO=ranks
  trap 'on_signal USR1' USR1
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
  announce
  "${PREFIX[@]}" "$@" &
  LAUNCH_PID=$!
  # Poll, not `wait PID`: a trap interrupts `wait` with a status that cannot be told from the launch's own, and
  # the stop may have to be passed on later (the ranks are not up yet). A signal cuts the sleep short; the trap
  # only takes note, the stop is passed on here (a trap that runs commands can lose a signal that comes meanwhile).
  while kill -0 "$LAUNCH_PID" 2>/dev/null; do
    if [[ -n $STOP_SIGNAL ]] && ((STOP_PASSED == 0)); then
      pass_stop || { sleep 0.2; continue; }  # no rank handles it yet: look again soon
    fi
    sleep 1 &
    wait $! 2>/dev/null || true
  done
  wait "$LAUNCH_PID" || status=$?
  if [[ -n $STOP_SIGNAL && $kind != python ]] && ((status != 0 && status != EXIT_STOPPED)); then
    # torchrun reports its workers' 75 as its own 1, and a node whose ranks stopped on another node's signal (the
    # stop flag is all-reduced) before they handled this one ends the same way; a rank that failed instead
    # resumes from its last checkpoint
    say "the launch ended with status $status after SIG$STOP_SIGNAL: exit $EXIT_STOPPED"
    status=$EXIT_STOPPED
  fi
  if ((status == EXIT_STOPPED)); then maybe_requeue; fi
  return "$status"
}

maybe_requeue() {
  [[ ${CBS_REQUEUE:-0} == 1 && -n ${SLURM_JOB_ID:-} && -z ${CBS_NODE_RANK:-} ]] || return 0
  local job=${SLURM_JOB_ID}
  [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]] && job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  if [[ -n $KILLED_BY ]]; then
    say "stopped by SIG$KILLED_BY: not requeued by this script (a scancel stays cancelled; Slurm requeues" \
      "by itself what it preempts with requeue or what \`scontrol requeue $job\` asks for)"
  elif scontrol requeue "$job"; then
    say "stopped: requeued job $job; it resumes from the checkpoint just saved"
  else
    say "stopped, but \`scontrol requeue $job\` failed: resubmit the task to resume the run"
  fi
}

# ---- pretrain, one process --------------------------------------------------------------------------------------
if ((GPUS_PER_NODE == 0 || GPUS_PER_NODE * NNODES == 1)); then
  cmd=("$PYTHON" -m cbs.pipeline.cli pretrain "$@")
  launch python "${cmd[@]}" && exit 0 || exit $?
fi

# ---- pretrain over several processes ----------------------------------------------------------------------------
expand_hostlist() {  # Slurm hostlist -> one name a line, like `scontrol show hostnames` (which wins if present)
  if command -v scontrol >/dev/null; then
    scontrol show hostnames "$1" || die "scontrol show hostnames '$1' failed"
    return
  fi
  local item="" items=() prefix ranges part lo hi width n c depth=0 i
  for ((i = 0; i < ${#1}; i++)); do  # split at the commas outside brackets
    c=${1:i:1}
    case $c in
      "[") depth=$((depth + 1)) ;;
      "]") depth=$((depth - 1)) ;;
    esac
    if [[ $c == , ]] && ((depth == 0)); then items+=("$item") item=""; else item+=$c; fi
  done
  items+=("$item")
  for item in "${items[@]}"; do
    [[ -n $item ]] || continue
    if [[ $item =~ ^([^][]*)$ ]]; then
      echo "$item"
    elif [[ $item =~ ^([^][]+)\[([0-9,-]+)\]$ ]]; then
      prefix=${BASH_REMATCH[1]}
      IFS=, read -ra ranges <<<"${BASH_REMATCH[2]}"
      for part in "${ranges[@]}"; do
        [[ $part =~ ^([0-9]+)(-([0-9]+))?$ ]] || die "cannot expand node list '$1' without scontrol"
        lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[3]:-${BASH_REMATCH[1]}} width=${#BASH_REMATCH[1]}
        for ((n = 10#$lo; n <= 10#$hi; n++)); do printf '%s%0*d\n' "$prefix" "$width" "$n"; done
      done
    else
      die "cannot expand node list '$1' without scontrol (only a,b and name[1-4,07] forms)"
    fi
  done
}

((NNODES == 1)) || [[ -n ${SLURM_JOB_ID:-} ]] \
  || die "NNODES=$NNODES needs a Slurm allocation (srun starts the nodes): submit with sbatch --nodes=$NNODES"
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
  mapfile -t HOSTS < <(expand_hostlist "$SLURM_JOB_NODELIST")
else
  HOSTS=("$(hostname -s)")
fi
((${#HOSTS[@]} >= NNODES)) || die "NNODES=$NNODES but the job has ${#HOSTS[@]} node(s): ${HOSTS[*]}"
HOSTS=("${HOSTS[@]:0:NNODES}")
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
NODE_RANK=${CBS_NODE_RANK:-0}
[[ $NODE_RANK =~ ^[0-9]+$ ]] && ((NODE_RANK < NNODES)) || die "CBS_NODE_RANK must be 0..$((NNODES - 1)): got '$NODE_RANK'"

if ((NNODES > 1)) && [[ -z ${CBS_NODE_RANK:-} ]]; then
  # one task per node, each this script again with the node's rank; since Slurm 22.05 srun no longer inherits the
  # job's --cpus-per-task: pass it on
  # shellcheck disable=SC2016  # $SLURM_NODEID and "$@" are for the bash that srun starts on each node
  cmd=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"}
    bash -c 'CBS_NODE_RANK=$SLURM_NODEID exec "$0" pretrain "$@"' "$SELF" "$@")
  if ((DRY_RUN)); then
    show run "${cmd[@]}"
    for ((n = 0; n < NNODES; n++)); do
      node=$(CBS_NODE_RANK=$n SLURM_NODEID=$n "$SELF" pretrain "$@") || exit $?
      mapfile -t lines <<<"$node"
      for line in "${lines[@]}"; do DRY_OUT+=("node $n $line"); done
    done
    dry_exit
  fi
  # srun passes SIGUSR1 on to each node's task (this script there), which passes it to that node's ranks
  launch srun "${cmd[@]}" && exit 0 || exit $?
fi

case $LAUNCHER in
  torchrun)
    cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
      --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${SLURM_JOB_ID:-cbs}"
      -m cbs.pipeline.cli pretrain "$@")
    launch ranks "${cmd[@]}" && exit 0 || exit $?
    ;;
  deepspeed)
    # DeepSpeed gives a node's ranks the GPU ids of its hostfile slots and overwrites CUDA_VISIBLE_DEVICES with
    # them. Where Slurm gave this node other GPUs (e.g. 4,5 without a device cgroup), list slots up to the
    # highest one and --include exactly those; the other nodes' entries only count ranks here.
    own_ids=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
    own_slots=$GPUS_PER_NODE
    if [[ ${CUDA_VISIBLE_DEVICES:-} =~ ^[0-9]+(,[0-9]+)*$ ]]; then
      own_ids=$CUDA_VISIBLE_DEVICES
      own_slots=$(($(tr , '\n' <<<"$CUDA_VISIBLE_DEVICES" | sort -n | tail -n 1) + 1))
    fi
    hostfile_lines=() include=""
    for i in "${!HOSTS[@]}"; do
      if ((i == NODE_RANK)); then
        hostfile_lines+=("${HOSTS[i]} slots=$own_slots")
        include+="${include:+@}${HOSTS[i]}:$own_ids"
      else
        hostfile_lines+=("${HOSTS[i]} slots=$GPUS_PER_NODE")
        include+="${include:+@}${HOSTS[i]}:$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
      fi
    done
    # node-local and removed at exit: the job writes nothing but its log
    if ((DRY_RUN)); then
      HOSTFILE=$HOSTFILE_TEMPLATE
    else
      HOSTFILE=$(mktemp "$HOSTFILE_TEMPLATE")
      trap 'rm -f "$HOSTFILE"' EXIT
      printf '%s\n' "${hostfile_lines[@]}" >"$HOSTFILE"
    fi
    # --no_ssh: each node's launcher starts only its own ranks (DeepSpeed would otherwise ssh-check the hosts).
    # --no_local_rank: the rank is in LOCAL_RANK; the flag would land before the stage (cli --local_rank=0 pretrain)
    cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile="$HOSTFILE" --include="$include" --no_ssh
      --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --no_local_rank
      --module cbs.pipeline.cli pretrain "$@")
    if ((DRY_RUN)); then
      for line in "${hostfile_lines[@]}"; do show hostfile "$line"; done
    fi
    launch ranks "${cmd[@]}" && exit 0 || exit $?
    ;;
esac
