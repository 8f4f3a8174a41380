"""The update alone, mpidqn's against a bare eager torch loop on the same batch shape, on the CPU or a GPU.

    python benchmarks/update_speed.py [--workload pong|cartpole] [--device cpu|cuda] [--rounds 100]
                                      [KEY=VALUE ...]

mpidqn: its learner (``build_learner`` from the workload's config, ``train.device`` set) samples a
round from a filled replay shard (random frames or observations, no env) and takes the round's updates
(``update_many``: forward, backward, clip, optimizer, target refresh). The bare loop does forward, TD
target, Huber loss, backward, clip and Adam on one fixed batch already on the device, the least an
update can do (``speed.py``'s loop). Rounds of the two alternate, so noise hits both alike; the rates
are medians over rounds, with a device synchronisation closing every timed round. Needs no ALE or
OpenCV: the Pong workload uses only the network and replay shapes of ``configs/pong.yaml``.
``KEY=VALUE`` overrides add a third side, mpidqn with them (e.g. ``train.compile_network=true``), timed
in the same alternation. ``--host-check`` adds a side with a GPU learner's per-update host work put back
(the loss's finiteness and the gradient norm read back every update, the batch copied from pageable
memory), to measure what deciding skip-or-take on the device and the pinned copy buy.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI
from replay_priority import cpu_model  # the sibling script (python benchmarks/update_speed.py)
from speed import WORKLOADS, bare_update

# observation shape, dtype and actions of each workload's env (known, so no env is built)
SHAPES = {"cartpole": ((4,), np.float32, 2), "pong": ((4, 84, 84), np.uint8, 6)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def mpidqn_round(workload: str, device: str, fill: int, overrides: tuple[str, ...] = (), host_check: bool = False):
    """A function running one round of mpidqn's updates (sampling included), and the round's updates.
    ``host_check``: the learner reads the skip decision back every update and copies from pageable memory."""
    from mpidqn.config import load_config
    from mpidqn.distributed.topology import Topology
    from mpidqn.learners.factory import build_learner
    from mpidqn.replay.frames import make_replay_shard

    w = WORKLOADS[workload]
    config = None if w.config is None else Path(__file__).resolve().parent.parent / w.config
    cfg = load_config(config, [*(o for o in w.overrides if not o.startswith("train.device")),
                                 f"train.device={device}", "parallel.sync_check_interval=0", *overrides])
    shape, dtype, n_actions = SHAPES[workload]
    torch.manual_seed(0)
    learner = build_learner(cfg, Topology.build(MPI.COMM_SELF), shape, n_actions, cfg.train.lr)
    if host_check:  # the learner as it was before skip-or-take moved to the device (2026-12-06)
        learner._device_skip, learner._staging = False, None
    stack = shape[0] if dtype == np.uint8 else 1
    replay = make_replay_shard(cfg.train.replay_storage, fill + 10, shape, dtype, 1, cfg.train.n_step,
                               cfg.train.gamma, stack)
    rng = np.random.default_rng(0)

    def obs() -> np.ndarray:
        if dtype == np.uint8:
            return rng.integers(0, 256, (1, *shape), dtype=np.uint8)
        return rng.normal(size=(1, *shape)).astype(dtype)

    o = obs()
    for i in range(fill):
        nxt = obs()
        end = np.array([i % 500 == 499])
        replay.add(o, rng.integers(0, n_actions, 1), rng.normal(size=1).astype(np.float32), nxt, end, np.array([False]))
        o = obs() if end[0] else nxt
    g, b = w.gradient_steps, w.batch
    per_round = max(g, 8)  # rounds of at least 8 updates, like the bare loop's

    def round_() -> None:
        for _ in range(per_round // g):
            learner.update_many(replay.sample_many(g, b, rng), g)
        _sync(device)

    return round_, per_round // g * g


def bare_round(workload: str, device: str):
    """One round of the bare loop (speed.py's, on ``device``), and its updates."""
    w = WORKLOADS[workload]
    update = bare_update(w, device)
    per_round = max(w.gradient_steps, 8)

    def round_() -> None:
        for _ in range(per_round):
            update()
        _sync(device)

    return round_, per_round


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(SHAPES), default="pong")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rounds", type=int, default=100, help="timed rounds per side (after 5 warm-up rounds)")
    p.add_argument("--fill", type=int, default=20_000, help="transitions in mpidqn's replay shard")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--host-check", action="store_true",
                   help="a side reading skip-or-take back every update, with pageable copies (see above)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="a third side: mpidqn with these")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sides = {"mpidqn": mpidqn_round(args.workload, args.device, args.fill)}
    label = "mpidqn " + " ".join(args.overrides)
    if args.overrides:
        sides[label] = mpidqn_round(args.workload, args.device, args.fill, tuple(args.overrides))
    if args.host_check:
        sides["mpidqn, host check"] = mpidqn_round(args.workload, args.device, args.fill, host_check=True)
    sides["bare"] = bare_round(args.workload, args.device)
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(args.rounds + 5):
        for name, (fn, _) in sides.items():
            t0 = time.perf_counter()
            fn()
            if i >= 5:
                seconds[name].append(time.perf_counter() - t0)
    rate = {k: sides[k][1] / float(np.median(v)) for k, v in seconds.items()}
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print(f"{args.workload}, {args.device} ({where}), torch {torch.__version__}, {args.threads} torch threads, "
          f"{args.rounds} alternating rounds of {sides['mpidqn'][1]} updates")
    for name in sides:
        what = "bare eager loop (fixed batch)" if name == "bare" else f"{name} (sampling included)"
        print(f"{what}: {rate[name]:,.1f} updates/s" + ("" if name == "bare" else
                                                        f", {rate[name] / rate['bare']:.2f}x the bare loop"))


if __name__ == "__main__":
    main()
