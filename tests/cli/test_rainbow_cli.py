"""The real command with every Rainbow part on (C51, or QR-DQN in its place): it trains, and ``mpidqn
evaluate`` of its checkpoint (mean weights of the noisy layers, C51's expected values or QR-DQN's quantile
means) plays the run's own final evaluation again."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml

from conftest import mpidqn, run

from mpidqn.io.runlog import read_log

RAINBOW = ["network.distributional=true", "network.num_atoms=21", "network.v_min=0", "network.v_max=50",
           "network.noisy=true", "network.dueling=true", "train.prioritized=true", "train.n_step=3"]

QR = ["network.distribution=qr", "network.kappa=0.5"]


@pytest.mark.parametrize("head", [[], QR], ids=["c51", "qr"])
def test_rainbow_run_evaluates_the_same_from_its_checkpoint(tmp_path, tiny, head):
    run_dir = tmp_path / "r"
    p = mpidqn(1, ["train", "--run-dir", str(run_dir), *tiny, *RAINBOW, *head, "eval.episodes=3"], timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "eps 0.000" in p.stdout  # noisy nets explore instead of epsilon
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["exploration"]["eps_start"] == 0.0 and saved["network"]["distributional"]
    assert saved["network"]["distribution"] == ("qr" if head else "c51")
    logged = read_log(run_dir / "log.h5").tables["evaluations"]
    assert logged["step"][-1] == 1200
    ev = run([sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--episodes", "3", "--json"])
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["step"] == 1200 and np.isclose(result["mean"], logged["mean"][-1]), (result, logged["mean"])
