#!/usr/bin/env bash
# On a lent 16-CPU machine, in one call (about 8 minutes): what ranks buy beyond threads, at 1-16 ranks.
#   bash benchmarks/device/scaling.sh          # there, after benchmarks/device/wheels.sh here
#   RANKS="1 2" STEPS=6000 MINATAR_STEPS=6000 bash benchmarks/device/scaling.sh   # a dry run on a small machine
# Every side gives its ranks the host's CPUs (parallel.torch_threads=auto: 1 rank alone runs every CPU as
# threads), plus one 1-rank side at 1 thread. CartPole at K = 8 (20k-step runs, seeds 100-101) and MinAtar
# Breakout at K = 8 (30k steps, seed 100) per env step, alternating; then `report` on the CartPole runs for
# the lockstep table (where the ranks wait) and the timelines. Runs stay in runs/device; at most 8 files
# (what the device tool brings back) go to $OUT: machine.txt, cartpole.md, minatar.md, report.txt,
# lockstep.csv and the timeline of the largest CartPole world.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="runs/device"
rm -rf "$out" && mkdir -p "$out"
if ! python3 -c "import gymnasium, minatar, mpidqn" 2>/dev/null; then
    # The lent image's python3 is a venv that holds torch, numpy, h5py, pandas, matplotlib, seaborn; install
    # into it (the machine is given back after the call). --no-deps: MinAtar asks for pytz, which is not there.
    python3 -m pip install -q --no-index --no-deps --ignore-installed --find-links .device/wheels \
        mpich mpi4py gymnasium farama-notifications cloudpickle minatar
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    hash -r  # mpiexec: now MPICH's, beside that python3
fi
{ nproc; python3 -c "import torch, mpi4py; print('torch', torch.__version__, 'mpi4py', mpi4py.__version__)"
  mpiexec --version | head -3; } > "$out/machine.txt" 2>&1
sides() {  # NAME RANKS OVERRIDES... per world size in $RANKS, K = 8 split over the ranks' envs
    for r in ${RANKS:-1 2 4 8 16}; do
        echo "--side ${r}rank $r env.num_envs=$(( r >= 8 ? 1 : 8 / r ))"
    done
}
# shellcheck disable=SC2046
timeout 300 python3 benchmarks/time_to_score.py --steps "${STEPS:-20000}" --seeds 100,101 --out "$out/cartpole" \
    train.batch_scale=8 parallel.torch_threads=auto \
    --side 1rank-1thread 1 env.num_envs=8 parallel.torch_threads=1 $(sides) 2>&1 | tail -15
cp "$out/cartpole/speed.md" "$out/cartpole.md" 2>/dev/null
timeout 120 python3 -m mpidqn report "$out"/cartpole/*rank-s100 --out "$out/report" > "$out/report.txt" 2>&1
tail -30 "$out/report.txt"
# shellcheck disable=SC2046
timeout 300 python3 benchmarks/time_to_score.py --config configs/minatar-breakout.yaml --steps "${MINATAR_STEPS:-30000}" \
    --seeds 100 --out "$out/minatar" train.batch_scale=8 parallel.torch_threads=auto \
    --side 1rank-1thread 1 env.num_envs=8 parallel.torch_threads=1 $(sides) 2>&1 | tail -10
cp "$out/minatar/speed.md" "$out/minatar.md" 2>/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    largest=$(for r in ${RANKS:-1 2 4 8 16}; do echo "$r"; done | sort -n | tail -1)
    cp "$out"/machine.txt "$out"/cartpole.md "$out"/minatar.md "$out"/report.txt "$out"/report/lockstep.csv \
       "$out/report/timeline_${largest}rank-s100.png" "$OUT"/ 2>/dev/null
    ls "$OUT"
fi
