"""Offline analysis over synthetic logs written by RunLog: tables, plots and the report command."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpidqn.analysis import load_run, report_main, summary, tidy
from mpidqn.analysis.curves import iqm_band
from mpidqn.analysis.paired import paired_step_difference
from mpidqn.analysis.tables import (aggregate, group_by_settings, idle_cpus_notes, lockstep, lockstep_table,
                                   phase_timeline, scaling_problem, time_breakdown, time_to_score, time_to_target)
from mpidqn.errors import EXIT_BAD_INPUT, EXIT_OK
from mpidqn.io.runlog import RunLog, read_log

STEPS = 2000
PLOTS = ["eval_return_vs_steps.png", "eval_return_vs_wall_time.png", "training_return_vs_steps.png",
         "loss_vs_steps.png", "throughput.png", "scaling.png"]


def make_run(run_dir: Path, seed: int, world: int, env_id: str = "CartPole-v1") -> Path:
    """A finished run: scalars every 100 steps, evaluations and timings every 500, episodes."""
    rng = np.random.default_rng(seed * 100 + world)
    config = (f"seed: {seed}\nenv:\n  id: {env_id}\nparallel:\n  pipeline_stages: 1\n"
              f"train:\n  total_steps: {STEPS}\ncheckpoint:\n  dir: {run_dir}/checkpoints\n")
    with RunLog(run_dir / "log.h5", {"config": config, "world_size": world, "pipeline_stages": 1}) as log:
        for step in range(0, STEPS + 1, 100):
            log.scalars(step, loss=rng.random(), epsilon=1 - step / STEPS, env_steps_per_s=900.0 * world)
            log.episodes(np.arange(world), np.full(world, step), rng.random(world), np.full(world, 20))
            if step % 500 == 0:
                log.evaluation(step, rng.normal(step / 10, 5, size=4))
                per_rank = [step * 0.01, step * 0.02, step * 0.005 * world]  # env, learn, comm
                log.timings(step, ["env", "learn", "comm"], np.tile(per_rank, (world, 1)))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [make_run(root / f"seed{s}_world{w}", s, w) for w in (1, 2) for s in (0, 1)]


def test_load_run(runs: list[Path]) -> None:
    run = load_run(runs[3])
    assert run.name == "seed1_world2" and run.seed == 1 and run.world_size == 2 and run.pipeline_stages == 1
    assert run.config["env"] == {"id": "CartPole-v1"} and run.setting("train.total_steps") == STEPS
    assert list(run.scalars["step"]) == list(range(0, STEPS + 1, 100))
    assert len(run.episodes) == 2 * 21 and list(run.evaluations["step"]) == [0, 500, 1000, 1500, 2000]
    assert all(len(r) == 4 for r in run.evaluations["returns"])
    assert len(run.timings) == 2 * 5 and run.events.empty and run.resumes.empty


def test_tidy_and_summary_hold_what_the_log_holds(runs: list[Path]) -> None:
    loaded = [load_run(r) for r in runs]
    frame = tidy(loaded)
    assert list(frame.columns) == ["run", "seed", "world", "step", "metric", "value"]
    for run, path in zip(loaded, runs):
        log = read_log(path / "log.h5").tables
        mine = frame[frame["run"] == run.name]
        assert np.array_equal(mine[mine["metric"] == "loss"]["value"], log["scalars"]["loss"])
        assert np.array_equal(mine[mine["metric"] == "eval_return"]["value"], log["evaluations"]["mean"])
    table = summary(loaded).set_index("run")
    assert list(table["world_size"]) == [1, 1, 2, 2] and (table["env_steps"] == STEPS).all()
    assert table.loc["seed0_world2", "comm_share"] == pytest.approx(20 / 80)  # comm 10*world of 60+10*world
    assert table.loc["seed0_world1", "final_eval_return"] == loaded[0].evaluations["mean"].iloc[-1]


def test_iqm_band() -> None:
    x = np.array([0.0, 10.0, 20.0])
    one = iqm_band([(x, np.array([1.0, 2.0, 3.0]))])
    assert one.n == 1 and np.array_equal(one.low, one.center) and np.array_equal(one.high, one.center)
    # different x grids: only the range both cover, each curve interpolated onto every x
    curves = [(x, np.array([0.0, 10.0, 20.0])), (np.array([5.0, 25.0]), np.array([5.0, 25.0]))]
    band = iqm_band(curves)
    assert np.array_equal(band.x, [5.0, 10.0, 20.0]) and np.allclose(band.center, band.x)
    flat = [(x, np.full(3, float(v))) for v in range(8)]
    spread = iqm_band(flat)
    assert np.allclose(spread.center, 3.5) and (spread.low < 3.5).all() and (spread.high > 3.5).all()
    assert np.array_equal(spread.low, iqm_band(flat).low)  # seeded: reproducible
    # the IQM ignores one wild seed where the mean does not
    wild = iqm_band([*flat[:7], (x, np.full(3, 1000.0))])
    assert np.all(wild.center < 5.0)


def test_aggregate_shows_the_worst_seed(runs: list[Path]) -> None:
    loaded = [load_run(r) for r in runs]
    table = summary(loaded)
    agg = aggregate(group_by_settings(loaded), table).set_index("setting")
    assert list(agg["runs"]) == [2, 2]
    one = table[table["world_size"] == 1]["final_eval_return"]
    assert agg.loc["world_size=1", "final_eval_min"] == one.min()
    assert agg.loc["world_size=1", "final_eval_ci_low"] <= agg.loc["world_size=1", "final_eval_iqm"] \
        <= agg.loc["world_size=1", "final_eval_ci_high"]


def test_grouping_and_scaling_condition(runs: list[Path], tmp_path: Path) -> None:
    loaded = [load_run(r) for r in runs]
    groups = group_by_settings(loaded)  # checkpoint.dir differs per run but is no setting
    assert {k: [r.name for r in v] for k, v in groups.items()} == {
        "world_size=1": ["seed0_world1", "seed1_world1"], "world_size=2": ["seed0_world2", "seed1_world2"]}
    assert scaling_problem(loaded) is None
    other = load_run(make_run(tmp_path / "pong", 0, 4, env_id="Pong"))
    assert "env.id" in str(scaling_problem([*loaded, other]))
    assert "same world size" in str(scaling_problem(loaded[:2]))


def test_time_breakdown_sums_resumed_segments(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    with RunLog(path, {"world_size": 2}, timing_names=["env", "comm"]) as log:
        log.timings(10, ["env", "comm"], [[1.0, 1.0], [1.0, 2.0]])
        log.timings(20, ["env", "comm"], [[2.0, 1.0], [2.0, 3.0]])
        log.timings(30, ["env", "comm"], [[9.0, 9.0], [9.0, 9.0]])  # past the checkpoint: dropped
    with RunLog(path, {"world_size": 3}, resume_step=20, timing_names=["env", "comm"]) as log:
        log.timings(40, ["env", "comm"], [[5.0, 0.0], [5.0, 0.0], [5.0, 1.0]])
    breakdown = time_breakdown(load_run(tmp_path))
    assert breakdown.to_dict("index") == {0: {"env": 7.0, "comm": 1.0}, 1: {"env": 7.0, "comm": 3.0},
                                          2: {"env": 5.0, "comm": 1.0}}


def test_phase_timeline_gives_each_interval_per_rank_across_a_resume(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    with RunLog(path, {"world_size": 2}, timing_names=["env", "comm"]) as log:
        log.timings(10, ["env", "comm"], [[1.0, 1.0], [1.0, 2.0]])
        log.timings(20, ["env", "comm"], [[2.0, 1.5], [4.0, 2.0]])
    with RunLog(path, {"world_size": 1}, resume_step=20, timing_names=["env", "comm"]) as log:
        log.timings(30, ["env", "comm"], [[0.5, 0.25]])  # a new process: its counters start at 0
    rows = phase_timeline(load_run(tmp_path)).sort_values(["step", "rank"])
    assert rows[["rank", "step", "env", "comm"]].values.tolist() == [
        [0, 10, 1.0, 1.0], [1, 10, 1.0, 2.0], [0, 20, 1.0, 0.5], [1, 20, 3.0, 0.0], [0, 30, 0.5, 0.25]]


def test_lockstep_splits_the_wait_into_transfer_imbalance_and_jitter(tmp_path: Path) -> None:
    names = ["env", "learn", "comm", "idle"]
    with RunLog(tmp_path / "log.h5", {"world_size": 2}, timing_names=names) as log:  # cumulative per rank
        log.timings(10, names, [[1.0, 2.0, 1.5, 0.0], [2.0, 2.0, 0.5, 0.0]])  # rank 1 works 1 s longer
        log.timings(20, names, [[2.0, 4.0, 2.5, 0.5], [3.0, 4.5, 1.5, 0.0]])  # ... 0.5 s longer
        log.timings(30, names, [[3.0, 6.0, 4.0, 0.5], [4.2, 6.5, 1.8, 0.0]])  # 0.2 s, rank 0 waits 1.5 s
    got = lockstep(load_run(tmp_path))
    assert got is not None
    total = 4.5 + 4.5 + 4.0  # the mean interval lengths
    assert got["world_size"] == 2 and got["intervals"] == 3
    assert got["wait_share"] == pytest.approx((1.0 + 1.25 + 0.9) / total)
    assert got["transfer_share"] == pytest.approx((0.5 + 1.0 + 0.3) / total)  # the busiest rank's comm
    assert got["imbalance_share"] == pytest.approx((0.5 + 0.25 + 0.1) / total)
    assert got["jitter_share"] == pytest.approx(0.5 / total)  # only the third interval waits beyond both
    assert (got["slowest_rank"], got["slowest_share"], got["imbalance_phase"]) == (1, 1.0, "env")


def test_lockstep_flags_an_oversubscribed_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """4 ranks of 2 torch threads on a 4-core host and 1 rank on a 2-core one: 2 threads per core on the
    crowded host, and report says that the transfer and jitter shares are inflated."""
    names = ["learn", "comm"]
    config = "seed: 0\nenv:\n  id: CartPole-v1\nparallel:\n  torch_threads: 2\n"
    meta = {"config": config, "world_size": 5, "rank_hosts": ["a", "a", "a", "a", "b"], "host_cores": {"a": 4, "b": 2}}
    with RunLog(tmp_path / "crowded" / "log.h5", meta, timing_names=names) as log:
        log.timings(10, names, np.tile([1.0, 0.5], (5, 1)))
        log.timings(20, names, np.tile([2.0, 1.0], (5, 1)))
    meta = {**meta, "host_cores": {"a": 8, "b": 2}}
    with RunLog(tmp_path / "roomy" / "log.h5", meta, timing_names=names) as log:
        log.timings(10, names, np.tile([1.0, 0.5], (5, 1)))
        log.timings(20, names, np.tile([2.0, 1.0], (5, 1)))
    assert lockstep(load_run(tmp_path / "crowded"))["threads_per_core"] == 2.0
    assert lockstep(load_run(tmp_path / "roomy"))["threads_per_core"] == 1.0
    report_main([str(tmp_path / "crowded"), str(tmp_path / "roomy"), "--out", str(tmp_path / "out")])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ") and "per core" in line]
    assert len(notes) == 1 and notes[0].startswith("note: crowded ran 2 rank threads per core")
    assert list(pd.read_csv(tmp_path / "out" / "lockstep.csv")["threads_per_core"]) == [2.0, 1.0]


def test_agents_whose_configs_differ_in_many_keys_are_labelled_by_their_run_names(tmp_path: Path) -> None:
    """Two agents side by side (benchmarks/agents.py): a legend of a dozen key=value pairs says nothing, so
    the groups take the name their run directories share; a few differing keys stay the label."""
    def run(name: str, seed: int, head: str, lr: float) -> Path:
        config = (f"seed: {seed}\nenv:\n  id: MinAtar/Breakout-v1\nnetwork:\n  distributional: {head == 'c51'}\n"
                  f"  noisy: {head == 'c51'}\n  dueling: {head == 'c51'}\ntrain:\n  lr: {lr}\n  n_step: "
                  f"{3 if head == 'c51' else 1}\n  prioritized: {head == 'c51'}\n")
        with RunLog(tmp_path / name / "log.h5", {"config": config, "world_size": 1}) as log:
            log.evaluation(100, np.array([1.0, 2.0]))
        return tmp_path / name

    agents = [load_run(run(f"{agent}-s{seed}", seed, head, 1e-3)) for agent, head in (("DQN", "q"), ("Rainbow", "c51"))
              for seed in (100, 101)]
    groups = group_by_settings(agents)
    assert {k: [r.name for r in v] for k, v in groups.items()} == {"DQN": ["DQN-s100", "DQN-s101"],
                                                                  "Rainbow": ["Rainbow-s100", "Rainbow-s101"]}
    lrs = [load_run(run(f"lr{i}-s{seed}", seed, "q", lr)) for i, lr in enumerate((1e-3, 1e-4)) for seed in (0, 1)]
    assert list(group_by_settings(lrs)) == ["train.lr=0.001", "train.lr=0.0001"]


def test_a_key_a_run_predates_counts_as_its_default(tmp_path: Path) -> None:
    """A run logged before network.kappa existed ran as its default: it groups with a newer run that logs it."""
    for name, extra in (("old-s0", ""), ("new-s1", "  kappa: 1.0\n"), ("other-s2", "  kappa: 0.5\n")):
        config = f"seed: 0\nenv:\n  id: CartPole-v1\nnetwork:\n  dueling: true\n{extra}"
        with RunLog(tmp_path / name / "log.h5", {"config": config, "world_size": 1}) as log:
            log.evaluation(100, np.array([1.0]))
    groups = group_by_settings([load_run(tmp_path / n) for n in ("old-s0", "new-s1", "other-s2")])
    assert {k: [r.name for r in v] for k, v in groups.items()} == {"network.kappa=1.0": ["old-s0", "new-s1"],
                                                                  "network.kappa=0.5": ["other-s2"]}


def test_lockstep_skips_1_rank_runs(runs: list[Path]) -> None:
    loaded = [load_run(r) for r in runs]
    assert lockstep(loaded[0]) is None
    table = lockstep_table(loaded)
    assert list(table["run"]) == ["seed0_world2", "seed1_world2"]
    assert np.allclose(table["imbalance_share"], 0.0)  # equal ranks: all of the wait is the Allreduce
    assert np.allclose(table["transfer_share"], table["wait_share"])


def test_time_to_score_per_world_size_against_the_best_1_rank_setting(runs: list[Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    loaded = [load_run(r) for r in runs]  # evaluation means about step / 10: 90 is first passed at step 1000
    first = [time_to_target(run, 90.0) for run in loaded]
    assert [step for step, _ in first] == [1000.0] * 4
    assert all(wall == float(run.evaluations["wall_time"].iloc[2]) for (_, wall), run in zip(first, loaded))
    assert np.isnan(time_to_target(loaded[0], 1e9)).all()  # never reached
    table = time_to_score(group_by_settings(loaded), 90.0).set_index("world_size")
    assert table.loc[1, "reached"] == table.loc[2, "reached"] == 2 and table.loc[1, "fraction_of_best_1_rank"] == 1.0
    medians = {w: float(np.median([wall for (_, wall), r in zip(first, loaded) if r.world_size == w])) for w in (1, 2)}
    assert table.loc[2, "fraction_of_best_1_rank"] == pytest.approx(medians[2] / medians[1])
    # the speed alone: seconds per 1k env steps up to the score, against the fastest 1-rank group's
    rates = {w: float(np.median([1000 * wall / step for (step, wall), r in zip(first, loaded) if r.world_size == w]))
             for w in (1, 2)}
    assert table.loc[2, "median_seconds_per_1k_steps"] == pytest.approx(rates[2])
    assert table.loc[2, "speed_fraction_of_best_1_rank"] == pytest.approx(rates[2] / rates[1])
    # the learning alone: both seeds passed at the same step at either world size
    assert list(table["paired_seeds"]) == [2, 2] and list(table["extra_steps_mean"]) == [0.0, 0.0]
    out = tmp_path / "out"
    assert report_main([*map(str, runs), "--out", str(out), "--target", "90"]) == EXIT_OK
    assert "time to the first evaluation >= 90" in capsys.readouterr().out
    assert list(pd.read_csv(out / "time_to_score.csv")["reached"]) == [2, 2]


def test_report_says_when_the_fastest_1_rank_setting_left_cpus_idle() -> None:
    """1 rank at 1 thread on 2 CPUs (0.5 threads per CPU) against 2 ranks: the fraction flatters the ranks."""
    scores = pd.DataFrame({"setting": ["a", "b", "c"], "world_size": [1, 1, 2], "fraction_of_best_1_rank": [1.0, 1.2, 0.6],
                           "threads_per_core": [0.5, 1.0, 1.0]})
    (note,) = idle_cpus_notes(scores)
    assert note.startswith("the fastest 1-rank setting (a) ran 0.5 compute threads per CPU")
    assert "parallel.torch_threads=auto" in note
    assert idle_cpus_notes(scores.assign(threads_per_core=[1.0, 0.5, 1.0])) == []  # the fastest used every CPU
    assert idle_cpus_notes(scores.assign(threads_per_core=np.nan)) == []  # logs that do not say


def test_paired_step_difference_is_seed_by_seed() -> None:
    """Extra env steps to the score against a reference on the seeds both reached it: mean and standard error."""
    n, mean, stderr = paired_step_difference({0: 10.0, 1: 20.0, 2: 30.0}, {0: 10.0, 1: 10.0, 3: 5.0})
    assert (n, mean) == (2, 5.0) and stderr == pytest.approx(5.0)  # diffs 0 and 10: std 7.07 over sqrt(2)
    n, mean, stderr = paired_step_difference({0: 12.0}, {0: 10.0})
    assert (n, mean) == (1, 2.0) and np.isnan(stderr)  # one seed: no standard error
    assert paired_step_difference({0: 1.0}, {1: 1.0})[0] == 0


def read_back(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(out / "summary.csv"), pd.read_csv(out / "tidy.csv")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


def test_report_over_seeds_and_world_sizes(runs: list[Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert report_main([*map(str, runs), "--out", str(out)]) == EXIT_OK
    printed = capsys.readouterr()
    assert printed.err == ""
    for name in PLOTS + [f"{kind}_{r.name}.png" for r in runs for kind in ("time_breakdown", "timeline")]:
        assert_png(out / name)
        assert f"wrote {out / name}" in printed.out
    table, frame = read_back(out)
    assert list(table["run"]) == [r.name for r in runs] and "seed1_world2" in printed.out
    for path in runs:
        log = read_log(path / "log.h5").tables
        mine = frame[frame["run"] == path.name]
        assert np.allclose(mine[mine["metric"] == "eval_return"]["value"], log["evaluations"]["mean"])
        assert np.allclose(mine[mine["metric"] == "epsilon"]["value"], log["scalars"]["epsilon"])
        assert set(mine["world"]) == {int(path.name[-1])}
    scaling = pd.read_csv(out / "scaling.csv")
    assert list(scaling["world_size"]) == [1, 2] and scaling["speedup"].iloc[0] == 1.0
    waits = pd.read_csv(out / "lockstep.csv")
    assert list(waits["run"]) == ["seed0_world2", "seed1_world2"] and "where the multi-rank runs wait" in printed.out


def test_report_skips_bad_runs_with_one_line_each(runs: list[Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (runs[0] / "log.h5").read_bytes()
    (truncated / "log.h5").write_bytes(data[: len(data) // 2])
    missing = tmp_path / "missing"
    out = tmp_path / "out"
    assert report_main([str(runs[0]), str(missing), str(truncated), str(runs[2]), "--out", str(out)]) == EXIT_OK
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"mpidqn report: skipping {missing}: ")
    assert err[1].startswith(f"mpidqn report: skipping {truncated}: ") and "truncated" in err[1]
    table, _ = read_back(out)
    assert list(table["run"]) == [runs[0].name, runs[2].name]
    assert_png(out / "scaling.png")


def test_report_defaults_and_exit_codes(runs: list[Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_main([str(empty), str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mpidqn report: skipping {empty}: no log.h5 in it",
                   f"mpidqn report: skipping {tmp_path / 'missing'}: no such directory",
                   "mpidqn report: no run could be read"]
    one = make_run(tmp_path / "one", 0, 1)
    assert report_main([str(one)]) == EXIT_OK
    assert "note: scaling plot skipped: every run has the same world size" in capsys.readouterr().out
    assert (one / "report" / "summary.csv").is_file() and not (one / "report" / "scaling.png").exists()
    assert report_main([]) == EXIT_BAD_INPUT  # argparse: RUN_DIR is required


def test_plots_read_at_a_glance(runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mpidqn.analysis import plots

    figs = {}

    def keep(fig, path):
        figs[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    one, other = load_run(runs[0]), load_run(runs[1])
    plots.eval_return_plot({"cfg": [one]}, "step", tmp_path / "one.png")
    ax = figs["one.png"].axes[0]
    assert "no confidence band" in ax.get_title() and "bootstrap" not in ax.get_title()
    assert not ax.collections and "(1 seed)" in ax.get_legend().get_texts()[0].get_text()
    plots.eval_return_plot({"cfg": [one, other]}, "step", tmp_path / "two.png")
    ax = figs["two.png"].axes[0]
    assert "95% bootstrap band" in ax.get_title() and len(ax.collections) == 1
    plots.throughput_plot([one, other], tmp_path / "throughput.png")
    assert figs["throughput.png"].axes[0].get_ylim()[0] == 0  # a rate axis starts at 0
    long = dataclasses.replace(load_run(runs[3]), name="CartPole-v1-s12-20261125-101010-with-a-long-suffix")
    plots.time_breakdown_plot(long, tmp_path / "breakdown.png")
    fig = figs["breakdown.png"]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig._suptitle.get_window_extent(canvas.get_renderer())
    assert long.name in fig._suptitle.get_text()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height  # not clipped
