"""Host labels of ranks (mpidqn.distributed.hosts) and the report's per-host grouping, without MPI."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from mpi4py import MPI

from mpidqn.analysis import load_run
from mpidqn.analysis.plots import time_breakdown_plot
from mpidqn.analysis.tables import host_groups
from mpidqn.distributed.hosts import cpu_shares, crowded_hosts, host_cores, host_labels, local_addresses, resolve_threads, this_host
from mpidqn.io.runlog import RunLog

from conftest import TINY, run


def test_hostnames_alone_where_they_tell_hosts_apart():
    assert host_labels([("n1", ("10.0.0.1",)), ("n1", ("10.0.0.1",)), ("n2", ("10.0.0.2",))]) == ["n1", "n1", "n2"]


def test_addresses_tell_apart_hosts_that_share_a_hostname():
    ranks = [("vm", ("10.231.0.1",)), ("vm", ("10.231.0.2",)), ("vm", ("10.231.0.2",)), ("other", ()),
             ("vm", ())]
    assert host_labels(ranks) == ["vm/10.231.0.1", "vm/10.231.0.2", "vm/10.231.0.2", "other", "vm/no-address"]


class _Gather:
    """A stand-in communicator whose allgather returns every rank's value."""

    def __init__(self, values):
        self.values = values

    def allgather(self, _mine):
        return self.values


def test_host_cores_counts_the_union_of_the_cpus_each_hosts_ranks_may_use():
    # two ranks pinned to different cores of n1, two ranks sharing n2's only core
    comm = _Gather([[0, 1], [2, 3], [0], [0]])
    assert host_cores(comm, ["n1", "n1", "n2", "n2"]) == {"n1": 4, "n2": 1}
    assert host_cores(MPI.COMM_SELF, ["me"]) == {"me": len(os.sched_getaffinity(0))}


def test_auto_threads_give_each_rank_its_share_of_its_hosts_cpus():
    # one rank alone on 16 CPUs; 8 unbound ranks on 16; a host of 2 CPUs shared by 4 ranks
    assert cpu_shares(["a"], [range(16)]) == [16]
    assert cpu_shares(["a"] * 8, [range(16)] * 8) == [2] * 8
    assert cpu_shares(["a"] * 4, [range(2)] * 4) == [1] * 4
    # 4 ranks bound to 2 CPUs each (Slurm --cpus-per-task=2) beside 3 unbound ranks on another 6-CPU host
    bound = [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert cpu_shares(["a"] * 4 + ["b"] * 3, [*bound, *[range(6)] * 3]) == [2, 2, 2, 2, 2, 2, 2]
    # never more than the rank's own affinity: 2 ranks bound to 1 CPU each on a host of 8
    assert cpu_shares(["a", "a"], [[0], range(1, 8)]) == [1, 4]
    assert resolve_threads("auto", MPI.COMM_SELF, 6) == 6 and resolve_threads(3, MPI.COMM_SELF, 6) == 3
    assert resolve_threads("auto", MPI.COMM_SELF) == len(os.sched_getaffinity(0))  # alone on this host


def test_a_host_whose_multi_threaded_ranks_share_cpus_is_named_in_a_warning():
    # 2 ranks of 2 threads on 2 CPUs (measured 20x slower); ranks of 1 thread on too few CPUs only take turns
    (line,) = crowded_hosts(["a", "a", "b"], {"a": 2, "b": 8}, [2, 2, 8])
    assert line.startswith("mpidqn: warning: a runs 2 rank(s) with 4 compute threads on 2 CPU(s)")
    assert line.endswith("set parallel.torch_threads=auto")
    assert crowded_hosts(["a"] * 4, {"a": 2}, [1] * 4) == []
    assert crowded_hosts(["a", "a"], {"a": 4}, [2, 2]) == []


def test_this_host_has_no_loopback_address():
    name, addrs = this_host()
    assert name and all(not a.startswith("127.") for a in addrs) and addrs == local_addresses()


def test_ranks_are_grouped_by_host_in_order_of_their_lowest_rank():
    assert host_groups([0, 1, 2, 3, 4], ["b", "a", "b", "a"]) == [("b", [0, 2]), ("a", [1, 3]), ("?", [4])]
    assert host_groups([1, 0], None) == [("?", [0, 1])]


def test_time_breakdown_plot_with_hosts(tmp_path: Path):
    with RunLog(tmp_path / "log.h5", {"world_size": 3, "rank_hosts": ["n2", "n1", "n2"]},
                timing_names=["env", "comm"]) as log:
        log.timings(10, ["env", "comm"], [[1.0, 1.0], [1.0, 2.0], [3.0, 1.0]])
    path = time_breakdown_plot(load_run(tmp_path), tmp_path / "t.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("setting", [1, "auto"])
def test_a_run_caps_numpys_blas_threads_like_torchs(tmp_path, setting):
    # A process that starts with 2 BLAS and 2 OpenMP threads (what a 2-core machine gives numpy and torch
    # by default) trains with parallel.torch_threads=1: afterwards both pools hold one thread, so a rank's
    # idle BLAS threads do not spin on the cores of the other ranks. With "auto" a rank alone on its host
    # takes every CPU it may run on, and the log records the number.
    overrides = {**{k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in TINY)}, "parallel.torch_threads": setting}
    code = ("import json, sys, torch, mpidqn; from threadpoolctl import threadpool_info; "
            "r = mpidqn.train(None, sys.argv[1], **json.loads(sys.argv[2])); "
            "print(json.dumps({'exit': r.exit_code, 'torch': torch.get_num_threads(), "
            "'blas': sorted({p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'})}))")
    p = run([sys.executable, "-c", code, str(tmp_path / "run"), json.dumps(overrides)],
            env={"OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0, p.stderr
    threads = 1 if setting == 1 else len(os.sched_getaffinity(0))
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"exit": 0, "torch": threads, "blas": [threads]}
    assert load_run(tmp_path / "run").metadata["rank_threads"] == [threads]
    assert f"threads/rank {threads}" in p.stdout + p.stderr  # the banner


_FAULTS = """
import resource, sys, torch
from mpi4py import MPI
from mpidqn.distributed.hosts import reuse_freed_memory
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers
torch.set_num_threads(1)
reused = reuse_freed_memory() if sys.argv[1] == "reuse" else None
learner = Learner(torch.nn.Sequential(*mlp_layers(4, 2, [256, 256])), Hyper(sync_check_interval=0), MPI.COMM_SELF)
def update(rows=512):
    obs = torch.randn(rows, 4)
    learner.backward(obs, torch.randint(2, (rows,)), learner.targets(torch.zeros(rows), obs, torch.full((rows,), 0.9)))
    learner.reduce_gradients()
    learner.step()
for _ in range(5):
    update()
per_update = []  # the quietest of 5 windows: the kernel's own sporadic faults (NUMA balancing) stay out
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        update()
    per_update.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(reused, min(per_update))
"""


def test_freed_memory_is_reused_so_updates_on_large_batches_do_not_page_fault():
    # An update at 512 rows of CartPole's MLP frees and allocates tensors of 512 KiB. glibc maps each block
    # above its threshold (128 KiB at the start) afresh; the threshold rises by itself only after some
    # allocation history, which differs between processes (about 600 faults per update measured in a
    # run, hardly any in another). Both processes here start with it fixed at glibc's 128 KiB, as in a
    # process where it never rose; reuse_freed_memory must bring the faults down from there.
    fixed = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    _, default = run([sys.executable, "-c", _FAULTS, "default"], env=fixed).stdout.split()
    reused, per_update = run([sys.executable, "-c", _FAULTS, "reuse"], env=fixed).stdout.split()
    assert reused == "True"  # glibc (the CI machine's C library)
    assert float(default) > 100, default  # what the setting removes
    assert float(per_update) < 5, (per_update, default)
