# shellcheck shell=bash
# The body shared by slurm/train_*.sh (sourced, not run): one task per GPU via srun, master
# address and port, CPU-only fallback, resume, and requeue after a preemption checkpoint.
#
# sbatch runs a spooled copy of the calling script, so the caller finds the repo from
# $SLURM_SUBMIT_DIR (submit from the repo root) or $MEGATRON_EASE_ROOT, sets CONFIG's default,
# sources this file and calls `launch_training "$@"`. The job runs from the repo root: relative
# paths in configs and in CONFIG are repo-relative, as they are for a local run.
#
# Arguments: the trainer gets `--config $CONFIG` and every positional argument as a dotted
# override (`train.steps=4 checkpoint.dir=/scratch/x`). The evaluation CLI gets `--config
# $CONFIG` and the arguments; with RUN_DIR set, `--checkpoint $RUN_DIR/checkpoints` (its latest)
# and `--out $RUN_DIR/eval/results.json` unless given:
#   ENTRY=megatron_ease.evaluate RUN_DIR=/scratch/run sbatch slurm/train_8b.sh --samples 500
# Any other ENTRY gets the positional arguments as they are, e.g. the launcher smoke test:
#   ENTRY=megatron_ease.distributed sbatch slurm/train_8b.sh --tensor-model-parallel-size 8
#
# Environment (optional; sbatch hands the submitting shell's environment to the job):
#   CONFIG             YAML config                            (default: the calling script's)
#   ENTRY              python module that srun runs           (megatron_ease.train)
#   RUN_DIR            put logging.run_dir and checkpoint.dir under this directory
#                      (default: the config's; overrides given as arguments still win)
#   PYTHON             interpreter                            (<repo>/.venv/bin/python, python3)
#   MAX_REQUEUES       restarts after which a preempted job is not requeued again     (100)
#   MEGATRON_EASE_ROOT the repo, when sbatch is not run from its root
#
# Preemption and resume. `#SBATCH --signal=USR1@900` has Slurm send USR1 to every task 15
# minutes before the time limit; on USR1 or SIGTERM the trainer saves a checkpoint on all ranks
# and exits 75 (EX_TEMPFAIL). It stops at the next step boundary, so the margin must hold the rest
# of one RL step (rollouts included), an eval and the save at the model's size: raise it with
# `sbatch --signal=USR1@<s>` if a step takes longer (a job that hits its limit first is not
# requeued and loses the steps since its last periodic checkpoint). Preemption by another job
# is different: Slurm sends SIGTERM and kills KillWait seconds later (30 by default), far less
# than a step plus a save at 7B, so such a run resumes from its last periodic checkpoint
# (checkpoint.interval) unless the partition gives preempted jobs time: a GraceTime that holds
# a step and a save, and PreemptParameters=send_user_signal to have the USR1 sent then.
# checkpoint.dir must be on a filesystem every node shares (rank 0 names the checkpoint all
# ranks resume; they fail, together, when one does not see it).
# srun returns the highest exit status of its tasks (128 + n for a
# task killed by signal n), so 75 means the ranks stopped to be resumed and none was killed by a
# signal; the script then runs `scontrol requeue` (Slurm does not requeue a job that ended by
# itself) and the next run resumes from checkpoint.dir's `latest`, the trainer's default.
# srun runs with --kill-on-bad-exit=0: with it, the first rank to exit 75 has the others sent
# SIGTERM and srun returns 143, hiding the 75; a rank that crashes instead ends the job through
# the process-group timeout (parallel.timeout_minutes). scancel, the time limit itself and
# Slurm's own preemption SIGTERM the batch shell too, so it never requeues a cancelled job
# (preemption requeues by itself).
# Slurm signals every process of a task, child processes included (measured: a forked child
# dies of USR1), so data-loader workers and other helpers must ignore USR1 and TERM.

TRAINER_ENTRY=megatron_ease.train
EVAL_ENTRY=megatron_ease.evaluate
EX_TEMPFAIL=75

log() { echo "[slurm] $*" >&2; }
die() { log "error: $*"; exit 2; }

# The smallest CPU count over the allocation's nodes: SLURM_JOB_CPUS_PER_NODE is e.g. "96(x2),64".
min_cpus_per_node() {
  tr ',' '\n' <<<"${SLURM_JOB_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}" | sed 's/(.*//' | sort -n | head -n 1
}

# GPUs per node as the allocation grants them: "8", "h100:8" or unset (no GPUs requested).
gpus_per_node() {
  local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  echo "${gpus##*:}"
}

launch_training() {
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm allocation: submit with sbatch (or run inside salloc)"
  [ -d "$REPO/megatron_ease" ] || die "$REPO is not the megatron_ease repo: submit from its root or set MEGATRON_EASE_ROOT"
  cd "$REPO" || die "cannot cd to $REPO"

  local entry=${ENTRY:-$TRAINER_ENTRY}
  local python=${PYTHON:-}
  if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=$REPO/.venv/bin/python; else python=python3; fi
  fi

  local args=("$@")
  if [ "$entry" = "$TRAINER_ENTRY" ]; then
    [ -f "$CONFIG" ] || die "config $CONFIG not found (CONFIG is relative to the repo root $REPO)"
    local run_dir_overrides=()
    if [ -n "${RUN_DIR:-}" ]; then
      run_dir_overrides=("logging.run_dir=$RUN_DIR" "checkpoint.dir=$RUN_DIR/checkpoints")
    fi
    # ${a[@]+"${a[@]}"}: an empty array under `set -u` is an "unbound variable" in bash < 4.4
    # (RHEL/CentOS 7 login nodes still ship 4.2).
    args=(--config "$CONFIG" ${run_dir_overrides[@]+"${run_dir_overrides[@]}"} "$@")
  elif [ "$entry" = "$EVAL_ENTRY" ]; then
    [ -f "$CONFIG" ] || die "config $CONFIG not found (CONFIG is relative to the repo root $REPO)"
    local given=" $* " run_dir_args=()
    if [ -n "${RUN_DIR:-}" ]; then
      [[ $given == *" --checkpoint"[\ =]* ]] || run_dir_args+=(--checkpoint "$RUN_DIR/checkpoints")
      [[ $given == *" --out"[\ =]* ]] || run_dir_args+=(--out "$RUN_DIR/eval/results.json")
    fi
    args=(--config "$CONFIG" ${run_dir_args[@]+"${run_dir_args[@]}"} "$@")
  fi

  local nodes=${SLURM_JOB_NUM_NODES:-1}
  local tasks_per_node=${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-$nodes} / nodes))}
  local cpus_per_task=$(($(min_cpus_per_node) / tasks_per_node))
  ((cpus_per_task >= 1)) || cpus_per_task=1
  local gpus
  gpus=$(gpus_per_node)

  # Rendezvous: the first host of the allocation and a port every task derives alike from the
  # job id (the formula of megatron_ease.distributed.port_from_job_id, which reads these first).
  # All of scontrol's output is read (sed, not head): head's early exit would SIGPIPE scontrol
  # on a long host list, and pipefail would end the script before srun, without a message.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
  MASTER_PORT=$((12000 + SLURM_JOB_ID % 20000))
  export MASTER_ADDR MASTER_PORT
  export PYTHONUNBUFFERED=1
  # torchrun's default: ranks share the node's cores; data loader workers are processes anyway.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

  if ((gpus > 0)); then
    ((tasks_per_node <= gpus)) || die "$tasks_per_node tasks per node but $gpus GPUs per node: one task per GPU"
    # Every task sees all of its node's GPUs and uses its local rank's (CUDA IPC / NVLink P2P
    # between ranks needs them visible); megatron_ease.distributed then picks NCCL.
    # Megatron's tensor/sequence-parallel communication overlap needs kernels queued in order.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # Rollouts have variable lengths; expandable segments keep the allocator from fragmenting.
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    # Cluster-specific NCCL settings belong in the submitting shell (sbatch passes them on):
    # NCCL_SOCKET_IFNAME (bootstrap interface), NCCL_IB_HCA / NCCL_IB_GID_INDEX (InfiniBand,
    # RoCE), NCCL_NET_GDR_LEVEL, and NCCL_DEBUG=INFO for a first run on a new cluster.
    # megatron-core also builds gloo data-parallel groups (CPU-side bookkeeping) that connect
    # over TCP: where a node's hostname resolves to loopback or the wrong NIC they fail at
    # start; GLOO_SOCKET_IFNAME names the interface (usually the same as NCCL_SOCKET_IFNAME).
  else
    # No GPUs in the allocation: hide any the node has so the python side takes gloo on CPU.
    export CUDA_VISIBLE_DEVICES=
  fi

  log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $nodes node(s) x $tasks_per_node task(s)," \
      "$gpus GPU(s)/node, $cpus_per_task CPU(s)/task, master $MASTER_ADDR:$MASTER_PORT"
  log "$python -m $entry ${args[*]}"

  local rc=0
  srun --kill-on-bad-exit=0 --cpus-per-task="$cpus_per_task" "$python" -m "$entry" ${args[@]+"${args[@]}"} || rc=$?

  if ((rc == EX_TEMPFAIL)); then
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((restarts >= ${MAX_REQUEUES:-100})); then
      log "preempted after $restarts restarts (MAX_REQUEUES): not requeueing; resubmit to resume"
      exit "$rc"
    fi
    log "checkpoint saved for preemption (exit $EX_TEMPFAIL): requeueing job $SLURM_JOB_ID"
    # This ends the current run; the requeued one resumes from the latest checkpoint.
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed: resubmit to resume"
  elif ((rc != 0)); then
    log "srun exited $rc"
  fi
  exit "$rc"
}
