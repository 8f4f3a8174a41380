"""eval.stop_at: a time-to-score run ends at the first evaluation that reaches the score, on every
rank together, checkpointed and with exit 0; a resume with a higher score trains on."""
from __future__ import annotations

from conftest import inspect_json, mpidqn
from mpidqn.io.runlog import read_log


def _events(run_dir) -> list[tuple[str, str]]:
    ev = read_log(run_dir / "log.h5").tables["events"]
    return [(k.decode(), m.decode()) for k, m in zip(ev["kind"], ev["message"])]


def test_run_ends_at_the_first_evaluation_reaching_the_score_and_resumes_past_it(tmp_path, tiny):
    run_dir = tmp_path / "r"
    args = ["train", "--run-dir", str(run_dir), *tiny, "eval.interval_steps=400"]
    p = mpidqn(2, [*args, "eval.stop_at=-1000"], timeout=180)  # any CartPole return reaches it
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "run ended early" in ln]
    assert len(lines) == 1 and "eval.stop_at=-1000 at step 400" in lines[0], p.stdout + p.stderr
    info = inspect_json(run_dir)
    assert info["complete"] and info["step"] == 400 and info["world_size"] == 2
    log = read_log(run_dir / "log.h5")
    assert log.tables["evaluations"]["step"].tolist() == [400]
    assert [k for k, _ in _events(run_dir)] == ["target"]

    # an unreachable score on resume: the run trains on to total_steps from the checkpoint at 400
    p = mpidqn(2, [*args, "eval.stop_at=1e9"], timeout=180)
    assert p.returncode == 0, p.stderr
    assert inspect_json(run_dir)["step"] == 1200
    assert read_log(run_dir / "log.h5").tables["evaluations"]["step"].tolist() == [400, 800, 1200]


def test_stop_at_without_periodic_evaluations_is_refused_in_one_line(tmp_path, tiny):
    p = mpidqn(1, ["train", "--run-dir", str(tmp_path / "r"), *tiny, "eval.stop_at=100"], timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].startswith("mpidqn: error: eval.stop_at: needs periodic evaluations")
    assert not (tmp_path / "r").exists()
