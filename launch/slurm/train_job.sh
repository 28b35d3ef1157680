# Sourced by the training jobs' batch scripts (distill.sbatch, adapt.sbatch): place the tasks,
# run ENTRY under srun with ARGS, forward stop signals and requeue after a saved stop.
#
#   run_training ENTRY ARG...    # needs $root (the repository), $PYTHON and $OUT (the run folder)

run_training() {
  local entry=$1
  shift
  # Placement from SLURM: every task reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (values exported
  # from the submitting shell would win over them, so drop those).
  unset RANK WORLD_SIZE LOCAL_RANK
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
  tasks_per_node=${SLURM_TASKS_PER_NODE%%[(,]*}  # "8(x2)" -> 8
  export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-$tasks_per_node}
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then  # srun 22.05 no longer reads SLURM_CPUS_PER_TASK
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK} SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  fi

  # Near the time limit SLURM sends USR1 to this shell (the batch script's --signal), TERM on scancel and
  # preemption: pass the request on to the tasks, which agree on a step, checkpoint there and exit
  # 75. srun forwards USR1 to its tasks but answers TERM by killing them at once, so both go on as
  # USR1 (the tasks treat the two alike). On USR1 requeue, only if this run saved a checkpoint
  # (else it would loop); on TERM (scancel or preemption) leave that to SLURM.
  checkpoint() { cat "$OUT/checkpoints/latest" 2>/dev/null || true; }
  start_checkpoint=$(checkpoint)
  signalled= srun_pid=
  forward() {
    signalled=$1
    echo "$1 received: asking the tasks to save and stop"
    [ -z "$srun_pid" ] || kill -USR1 "$srun_pid" 2>/dev/null || true
  }
  trap 'forward USR1' USR1
  trap 'forward TERM' TERM
  echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT"
  # --gpu-bind=none: every task sees its node's GPUs and takes cuda:LOCAL_RANK, also with --gpus-per-task.
  # --wait=60: once a task ends (a crash, or 75 after a stop), srun ends the others 60 s later, so
  # none blocks in a collective for long; --kill-on-bad-exit would end them at once, also while
  # they tear down after saving, and their status would hide the 75 (tested).
  srun --wait=60 --gpu-bind=none "$PYTHON" "$root/$entry" "$@" &
  srun_pid=$!
  [ -z "$signalled" ] || kill -USR1 "$srun_pid"  # it came while srun started
  # A trapped signal ends wait early: wait again while srun runs.
  status=0
  wait "$srun_pid" || status=$?
  while kill -0 "$srun_pid" 2>/dev/null; do status=0; wait "$srun_pid" || status=$?; done
  trap '' USR1 TERM  # from here on nothing runs to stop (`scontrol requeue` itself sends TERM)
  [ "$status" = 75 ] || exit "$status"  # 75: the tasks saved a checkpoint on a stop request
  if [ "$signalled" = TERM ]; then  # scancel, or preemption (SLURM requeues those itself if told to)
    echo "TERM request (job cancelled or preempted): progress saved, requeueing left to SLURM for job $SLURM_JOB_ID"
    exit 75
  fi
  if [ "$(checkpoint)" = "$start_checkpoint" ]; then
    echo "${signalled:-stop} request: no progress saved since the start, not requeueing job $SLURM_JOB_ID"
    exit 75
  fi
  echo "${signalled:-stop} request: saved $(checkpoint), requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed: resubmit to resume" >&2
}
