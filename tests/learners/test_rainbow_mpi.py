"""C51 and QR-DQN with noisy layers across real MPI processes (tests/mpi/rainbow_grads.py): data parallel at 2 and 3
ranks with both CPU reducers equals one process on the union of the minibatches, and the replicas stay
bit-identical (the pipeline's case is in test_pipeline_mpi.py, resume in train/test_checkpoint.py)."""
from __future__ import annotations

import pytest

from conftest import MPI_SCRIPTS, mpirun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [2, 3])
def test_distributional_noisy_updates_equal_one_process_on_the_union(n):
    p = mpirun(n, [str(MPI_SCRIPTS / "rainbow_grads.py")], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("OK") == n
