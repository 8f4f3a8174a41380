"""``evaluate --video DIR``: one MP4 per greedy episode, every frame in it (read back with ffmpeg)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from conftest import ROOT, mpidqn, run
from mpidqn.envs.presets import EnvSpec
from mpidqn.envs.video import recorder, recording_spec, video_frame
from mpidqn.train.evaluation import evaluate_policy


def frames_and_size(path: Path) -> tuple[int, tuple[int, int]]:
    """(frame count, (width, height)) of a video, as ffmpeg decodes it."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0], tuple(meta["size"])


def evaluate(run_dir: Path, *extra: str) -> dict:
    p = run([sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--episodes", "3", "--json", *extra])
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no encoder chatter, no display warnings
    return json.loads(p.stdout)


def test_evaluate_records_every_episode(tmp_path, tiny):
    run_dir = tmp_path / "r"
    assert mpidqn(1, ["--run-dir", str(run_dir), *tiny]).returncode == 0
    videos = tmp_path / "videos"
    result = evaluate(run_dir, "--video", str(videos))
    names = [f"CartPole-v1-step1200-episode-{i}.mp4" for i in range(3)]
    assert result["videos"] == [str(videos / n) for n in names]
    assert sorted(p.name for p in videos.iterdir()) == names
    for name, length in zip(names, result["lengths"]):
        assert frames_and_size(videos / name) == (length + 1, (600, 400))  # the reset frame, one per step
    # recording plays the same episodes as an evaluation without it
    assert evaluate(run_dir)["returns"] == result["returns"]


@pytest.mark.parametrize("spec, size", [
    (EnvSpec("MinAtar/Breakout-v1", "minatar", max_episode_steps=12), (160, 160)),  # 10x10 scaled up 16x
    (EnvSpec("ALE/Pong-v5", "atari", max_episode_steps=12, frame_stack=4), (160, 210)),  # the colour screen
])
def test_minatar_and_atari_render_to_video(tmp_path, spec, size):
    spec = recording_spec(spec)
    result = evaluate_policy(lambda obs: np.zeros(len(obs), np.int64), spec, 1, seed=0,
                             wrap_env=recorder(spec, tmp_path / "videos", "v"))
    assert result["lengths"] == [12]
    assert frames_and_size(tmp_path / "videos" / "v-episode-0.mp4") == (13, size)


def test_video_frame_is_uint8_even_and_large_enough():
    grid = np.zeros((10, 10, 3))
    grid[0, 0] = 1.0
    frame = video_frame(grid)
    assert frame.dtype == np.uint8 and frame.shape == (160, 160, 3)
    assert (frame[:16, :16] == 255).all() and (frame[16:, 16:] == 0).all()  # one cell = 16x16 pixels
    assert video_frame(np.zeros((211, 161, 3), np.uint8)).shape == (212, 162, 3)


def test_missing_encoder_is_named(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "moviepy.py").write_text("raise ModuleNotFoundError(\"No module named 'moviepy'\", name='moviepy')\n")
    p = run([sys.executable, "-m", "mpidqn", "evaluate", str(tmp_path), "--video", str(tmp_path / "v")],
            env={"PYTHONPATH": f"{ROOT}:{shadow}"})
    assert p.returncode == 2
    assert p.stderr.strip() == ('mpidqn evaluate: error: --video needs moviepy (moviepy is not installed): '
                                'pip install -e ".[video]" (source checkout)')
    assert not (tmp_path / "v").exists()
