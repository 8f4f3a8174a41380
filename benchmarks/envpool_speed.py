"""Atari env-steps/s of the EnvPool backend against gymnasium's async vector env, side by side.

    pip install -e ".[envpool]"
    python benchmarks/envpool_speed.py [--num-envs 4 8] [--steps 150] [--repeats 3]
    mpiexec -n 2 python benchmarks/envpool_speed.py

What is timed: the env alone, as the trainer drives it (``make_vector_env`` of the run's config,
``configs/pong.yaml`` by default: ALE/Pong-v5, 4 stacked 84x84 gray frames, frame skip 4, no sticky
actions): uniformly random actions, ``step`` with its same-step autoreset and ``true_next_obs`` for
finished sub-envs. No network, no replay. Backends: ``env.async_envs: true`` (gymnasium
AsyncVectorEnv: one subprocess per copy, AtariPreprocessing in Python) and ``env.backend: envpool``
(one EnvPool per rank, C++ threads), with the same ``env.num_envs`` per rank.

Every rank builds both vector envs for one ``num_envs`` and then times segments of ``--steps`` vector
steps, alternating the backends (the first backend alternates too) so that machine noise hits both
alike; a Barrier starts and ends each segment on all ranks. env-steps/s are global: world x num_envs x
steps / the slowest rank's time. Figures are medians over ``--repeats`` segments; the ratio is envpool
over async.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np
from mpi4py import MPI
from replay_priority import (
    cpu_model,  # the sibling script (python benchmarks/envpool_speed.py)
)

from mpidqn.config import load_config
from mpidqn.envs.presets import spec_from_config
from mpidqn.envs.vector import (
    env_reset_seeds,
    make_vector_env,
    spawn_seeds,
    true_next_obs,
)

BACKENDS = ("async", "envpool")


def build(backend: str, spec, num_envs: int, seeds: list[int]):
    envs = make_vector_env(spec, num_envs, asynchronous=backend == "async",
                           backend="envpool" if backend == "envpool" else "gymnasium")
    envs.reset(seed=seeds)
    return envs


def segment(envs, rng: np.random.Generator, steps: int, comm) -> float:
    """Seconds of ``steps`` random vector steps on the slowest rank."""
    n, actions = envs.num_envs, envs.single_action_space.n
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        next_obs, _, terminated, truncated, info = envs.step(rng.integers(0, actions, n))
        true_next_obs(next_obs, terminated | truncated, info)
    spent = time.perf_counter() - t0
    comm.Barrier()
    return comm.allreduce(spent, op=MPI.MAX)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/pong.yaml")
    p.add_argument("--num-envs", type=int, nargs="+", default=[4, 8])
    p.add_argument("--steps", type=int, default=150, help="vector steps per timed segment")
    p.add_argument("--warmup", type=int, default=20, help="untimed vector steps after building")
    p.add_argument("--repeats", type=int, default=3, help="timed segments per backend")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    a = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    load0 = os.getloadavg()[0]
    spec = spec_from_config(load_config(a.config, a.overrides).env)
    seeds = spawn_seeds(0, world, rank)
    rng = np.random.default_rng(seeds["explore"])
    rows = []
    t_start = time.perf_counter()
    for n in a.num_envs:
        envs = {b: build(b, spec, n, env_reset_seeds(seeds["env"], n)) for b in BACKENDS}
        for b in BACKENDS:
            segment(envs[b], rng, a.warmup, comm)
        spent: dict[str, list[float]] = {b: [] for b in BACKENDS}
        for r in range(a.repeats):
            for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                spent[b].append(segment(envs[b], rng, a.steps, comm))
        for e in envs.values():
            e.close()
        rate = {b: world * n * a.steps / float(np.median(spent[b])) for b in BACKENDS}
        rows.append((n, rate, [world * n * a.steps / s for s in spent["envpool"]],
                     [world * n * a.steps / s for s in spent["async"]]))
    if rank == 0:
        import ale_py
        import envpool
        import gymnasium

        print(f"{datetime.date.today()}; {platform.platform()}; {cpu_model()}; {os.cpu_count()} cores; "
              f"{world} rank(s); envpool {envpool.__version__}, gymnasium {gymnasium.__version__}, "
              f"ale-py {ale_py.__version__}, numpy {np.__version__}; "
              f"{' '.join(MPI.Get_library_version().split()[:3])}; "
              f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
              f"{time.perf_counter() - t_start:.0f} s")
        print(f"{spec.id}, frame_stack {spec.frame_stack}, sticky {spec.sticky_actions}; random actions; "
              f"median of {a.repeats} segments of {a.steps} vector steps, alternating; global env-steps/s\n")
        print("| ranks | num_envs per rank | gymnasium async | envpool | envpool / async | envpool segments | async segments |")
        print("|---|---|---|---|---|---|---|")
        for n, rate, ep, asy in rows:
            print(f"| {world} | {n} | {rate['async']:,.0f} | {rate['envpool']:,.0f} | "
                  f"{rate['envpool'] / rate['async']:.2f} | {', '.join(f'{x:,.0f}' for x in ep)} | "
                  f"{', '.join(f'{x:,.0f}' for x in asy)} |")


if __name__ == "__main__":
    main()
