"""Prioritized replay per batch: mpidqn's ReplayShard against TorchRL's prioritized buffers.

    pip install torchrl tensordict   # only for this benchmark
    python benchmarks/replay_priority.py [--capacity 1000000] [--batch 32 256] [--rounds 21] [--per-round 300]

Both sides hold the same full buffer of CartPole-like rows (obs and next_obs 4 float32, action,
n-step return, discount), capacity 1M, alpha 0.6, beta 0.4, eps 1e-6, and the same initial
priorities (random |TD| for every row). Per batch they do what a prioritized DQN update needs from
its replay:
- sample: draw slots by priority, gather the rows (as torch tensors: mpidqn wraps its numpy rows
  with torch.from_numpy) and compute the importance weights;
- update: write |TD| of the drawn slots back (new priorities ``|TD| + eps``).
mpidqn: ``ReplayShard(priority=(0.6, 1e-6))``: sample_slots, gather, importance_weights over its
ShardMass; update_priorities. TorchRL: ``TensorDictPrioritizedReplayBuffer`` (index and weight come
back in the sampled TensorDict) and ``PrioritizedReplayBuffer(return_info=True)``, both on a
``LazyTensorStorage``; ``update_priority(index, td)``.

TorchRL's prioritized sampler needs its C++ extension (``torchrl._torchrl``) to load with the
installed torch. TorchRL's wheels only load with the torch they were built against (0.13.3 and 0.14.1
do not with torch 2.13.0). In that case, build TorchRL's CPU segment tree
(``torchrl/csrc/segment_tree.h``) against the installed torch with ``torch.utils.cpp_extension``.

The implementations alternate in rounds (mpidqn, TorchRL TD, TorchRL plain, then the next round in
reverse order) so machine noise hits all alike; each figure is the median over rounds of the mean
per batch, in microseconds, with 1 torch thread. The drawn slots of every side are checked to
span the whole buffer. No timing is asserted.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import time

import numpy as np
import torch

from mpidqn.replay.priority import importance_weights
from mpidqn.replay.shard import ReplayShard

ALPHA, BETA, EPS = 0.6, 0.4, 1e-6
OBS = 4
CHUNK = 100_000


def rows(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"obs": rng.normal(size=(n, OBS)).astype(np.float32), "actions": rng.integers(2, size=n),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_obs": rng.normal(size=(n, OBS)).astype(np.float32),
            "discounts": np.full(n, 0.99, np.float32)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Mpidqn:
    name = "mpidqn ReplayShard"

    def __init__(self, capacity: int, init_td: np.ndarray, seed: int) -> None:
        self.shard = ReplayShard(capacity, (OBS,), np.float32, 1, priority=(ALPHA, EPS))
        rng = np.random.default_rng(0)
        for start in range(0, capacity, CHUNK):
            n = min(CHUNK, capacity - start)
            self.shard.extend(rows(n, rng))
            self.shard.update_priorities(np.arange(start, start + n), init_td[start:start + n])
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int):
        slots = self.shard.sample_slots(batch, self.rng)
        b = self.shard.gather(slots)
        weights = importance_weights(self.shard.slot_masses(slots), [self.shard.mass()], BETA)
        tensors = [torch.from_numpy(a) for a in b]
        return slots, tensors, torch.from_numpy(weights)

    def update(self, slots, td: np.ndarray, td_t: torch.Tensor) -> None:
        self.shard.update_priorities(slots, td)

    @staticmethod
    def slots(drawn) -> np.ndarray:
        return np.asarray(drawn)


class TorchRL:
    def __init__(self, capacity: int, init_td: np.ndarray, seed: int, tensordict_buffer: bool) -> None:
        from tensordict import TensorDict
        from torchrl.data import (
            LazyTensorStorage,
            PrioritizedReplayBuffer,
            TensorDictPrioritizedReplayBuffer,
        )

        self.td_buffer = tensordict_buffer
        cls = TensorDictPrioritizedReplayBuffer if tensordict_buffer else PrioritizedReplayBuffer
        self.name = f"TorchRL {cls.__name__}"
        self.rb = cls(alpha=ALPHA, beta=BETA, eps=EPS, storage=LazyTensorStorage(capacity))
        rng = np.random.default_rng(0)  # the same rows as mpidqn's
        for start in range(0, capacity, CHUNK):
            n = min(CHUNK, capacity - start)
            data = TensorDict({k: torch.from_numpy(v) for k, v in rows(n, rng).items()}, batch_size=[n])
            self.rb.extend(data)
            self.rb.update_priority(torch.arange(start, start + n), torch.from_numpy(init_td[start:start + n]))
        np.random.seed(seed)  # TorchRL's prioritized sampler draws with np.random
        torch.manual_seed(seed)

    def sample(self, batch: int):
        if self.td_buffer:
            td = self.rb.sample(batch)
            return td["index"], td, td["priority_weight"]
        td, info = self.rb.sample(batch, return_info=True)
        return info["index"], td, info["priority_weight"]

    def update(self, index, td: np.ndarray, td_t: torch.Tensor) -> None:
        self.rb.update_priority(index, td_t)

    @staticmethod
    def slots(drawn) -> np.ndarray:
        return torch.as_tensor(drawn).numpy()


def run_round(impl, batch: int, n: int, td: np.ndarray, drawn: list) -> tuple[float, float]:
    """Mean seconds per batch of sample and update over ``n`` batches."""
    td_t = torch.from_numpy(td)
    t_sample = t_update = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        slots, _, weights = impl.sample(batch)
        t1 = time.perf_counter()
        impl.update(slots, td[i], td_t[i])
        t2 = time.perf_counter()
        t_sample += t1 - t0
        t_update += t2 - t1
        drawn.append(impl.slots(slots))
        if i == 0:
            w = np.asarray(weights)
            assert w.shape == (batch,) and np.all((w > 0) & (w <= 1.0 + 1e-5)), f"{impl.name}: weights {w}"
    return t_sample / n, t_update / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--capacity", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--per-round", type=int, default=300, help="batches per round and implementation")
    a = p.parse_args()
    load0 = os.getloadavg()[0]
    torch.set_num_threads(1)
    init_td = np.random.default_rng(1).exponential(size=a.capacity).astype(np.float32)
    impls: list = [Mpidqn(a.capacity, init_td, 2)]
    torchrl_version = "not installed"
    try:
        import torchrl
        logging.getLogger("torchrl").setLevel(logging.WARNING)
        torchrl_version = torchrl.__version__
        impls += [TorchRL(a.capacity, init_td, 2, True), TorchRL(a.capacity, init_td, 2, False)]
    except ImportError as e:
        print(f"TorchRL unavailable ({e}); mpidqn alone")
    td_rng = np.random.default_rng(3)
    results = {(impl.name, b): [] for impl in impls for b in a.batch}
    for batch in a.batch:
        drawn: dict[str, list] = {impl.name: [] for impl in impls}
        for r in range(a.rounds):
            td = td_rng.exponential(size=(a.per_round, batch)).astype(np.float32)  # the same |TD| for all
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                results[(impl.name, batch)].append(run_round(impl, batch, a.per_round, td, drawn[impl.name]))
        for name, parts in drawn.items():  # every side draws from the whole buffer
            s = np.concatenate(parts)
            assert s.min() >= 0 and s.max() < a.capacity, name
            assert s.min() < a.capacity // 100 and s.max() >= a.capacity - a.capacity // 100, \
                f"{name}: drawn slots span [{s.min()}, {s.max()}] of {a.capacity}"
            uniform = a.capacity * -np.expm1(-len(s) / a.capacity)  # distinct slots of uniform draws
            assert len(np.unique(s)) > 0.5 * uniform, f"{name}: {len(np.unique(s))} distinct slots"

    print(f"{datetime.date.today()}; {platform.platform()}; {cpu_model()}; {os.cpu_count()} cores; "
          f"torch {torch.__version__} (1 thread), numpy {np.__version__}, TorchRL {torchrl_version}; "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"capacity {a.capacity:,} (full), obs {OBS} float32, alpha {ALPHA}, beta {BETA}; "
          f"median over {a.rounds} rounds of {a.per_round} batches; microseconds per batch\n")
    base_name = impls[0].name
    print("| batch | replay | sample | update | sample + update | TorchRL / mpidqn |")
    print("|---|---|---|---|---|---|")
    for batch in a.batch:
        base = np.median([s + u for s, u in results[(base_name, batch)]])
        for impl in impls:
            res = results[(impl.name, batch)]
            s, u = np.median([x[0] for x in res]), np.median([x[1] for x in res])
            tot = np.median([x[0] + x[1] for x in res])
            ratio = "" if impl.name == base_name else f"{tot / base:.2f}×"
            print(f"| {batch} | {impl.name} | {s * 1e6:.1f} | {u * 1e6:.1f} | {tot * 1e6:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
