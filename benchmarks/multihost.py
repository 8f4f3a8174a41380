"""2 hosts x 1 rank (TCP) against 1 host x 2 ranks (shared memory): Allreduce share and env-steps/s.

    sudo python benchmarks/multihost.py [--steps 20000] [--rounds 10] [--config configs/cartpole.yaml]

The "hosts" are network namespaces joined by a bridge (tests/netns.py, root only; MPICH's Hydra
mpiexec); both layouts are launched the same way, so only the transport between the two ranks
differs: ofi/tcp over a veth pair, or MPICH's shared memory within one host. Runs
benchmarks/allreduce_share.py and a CartPole training run of `--steps` global env steps (no
evaluation, no checkpoints; env-steps/s from the run log, as benchmarks/scaling.py) per layout.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from netns import NetnsHosts, hydra_mpiexec, netns_unavailable  # noqa: E402

from mpidqn.analysis import load_run  # noqa: E402

LAYOUTS = {"1 host x 2 ranks (shm)": [2, 0], "2 hosts x 1 rank (tcp)": [1, 1]}


def launch(hosts: NetnsHosts, layout: list[int], args: list[str]) -> str:
    env = {**os.environ, **hosts.env(), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run(hosts.mpiexec_argv(layout, [sys.executable, *args]), capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=3600)
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/cartpole.yaml")
    p.add_argument("--steps", type=int, default=20_000, help="global env steps of each training run")
    p.add_argument("--rounds", type=int, default=10, help="--rounds of allreduce_share.py")
    args = p.parse_args()
    why = netns_unavailable() or hydra_mpiexec()
    if why:
        sys.exit(f"cannot run: {why}")
    rows = []
    with NetnsHosts(2) as hosts, tempfile.TemporaryDirectory() as tmp:
        for name, layout in LAYOUTS.items():
            out = launch(hosts, layout, [str(ROOT / "benchmarks" / "allreduce_share.py"), "--rounds", str(args.rounds)])
            fused = re.search(r"fused: ([\d.]+) ms/update, reduction ([\d.]+) ms/update = ([\d.]+)%", out)
            if fused is None:
                sys.exit(f"unexpected output of allreduce_share.py:\n{out}")
            run_dir = Path(tmp) / name.split()[0]
            launch(hosts, layout, ["-m", "mpidqn", "train", "--config", args.config, "--run-dir", str(run_dir),
                                   "log.progress=none", "eval.interval_steps=0", "eval.episodes=1",
                                   "checkpoint.interval_steps=0", "env.num_envs=1", f"train.total_steps={args.steps}"])
            wall = float(load_run(run_dir).scalars["wall_time"].iloc[-1])
            rows.append((name, float(fused[1]), float(fused[2]), float(fused[3]), args.steps / wall))
            print(f"{name}: {out.strip()}\n  training: {rows[-1][-1]:,.0f} env-steps/s", flush=True)
    print(f"\n{'layout':<24} {'ms/update':>9} {'allreduce ms':>12} {'share':>6} {'env-steps/s':>11}")
    for name, update, reduce, share, rate in rows:
        print(f"{name:<24} {update:>9.3f} {reduce:>12.3f} {share:>5.1f}% {rate:>11,.0f}")
    print(f"cores on this machine: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
