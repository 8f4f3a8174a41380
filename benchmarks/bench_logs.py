"""Cost of logging in the training loop: RunLog.scalars, PhaseTimer phases, and flushes.

    python benchmarks/bench_logs.py [--rows 200000]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mpidqn.io.runlog import MAX_PENDING_ROWS, RunLog
from mpidqn.train.timing import PhaseTimer


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    n = parser.parse_args().rows
    with tempfile.TemporaryDirectory() as tmp, RunLog(Path(tmp) / "log.h5", {}, flush_interval_s=1e9) as log:
        us = per_call_us(lambda i: log.scalars(i, loss=0.1, q_mean=1.0, epsilon=0.5, env_steps_per_s=1e4), n)
        print(f"RunLog.scalars (4 values):     {us:6.2f} us/call")
        log.flush()
        for i in range(MAX_PENDING_ROWS - 1):
            log.scalars(i, loss=0.1)
        start = time.perf_counter()
        log.flush()
        print(f"RunLog.flush of {MAX_PENDING_ROWS - 1} rows:  {time.perf_counter() - start:6.3f} s")
        us = per_call_us(lambda i: log.maybe_flush(), n)
        print(f"RunLog.maybe_flush (nothing due): {us:6.2f} us/call")
        block = [np.zeros(64, np.int32), np.arange(64), np.ones(64), np.full(64, 200)]
        us = per_call_us(lambda i: log.episodes(*block), n // 64)
        print(f"RunLog.episodes (64 at once):  {us:6.2f} us/call")
    timer = PhaseTimer(("env", "learn", "comm"))

    def phase(i: int) -> None:
        with timer("env"):
            pass

    print(f"PhaseTimer phase (enter+exit): {per_call_us(phase, n):6.2f} us/call")


if __name__ == "__main__":
    main()
