"""MP4 videos of episodes (``evaluate --video DIR``): gymnasium's RecordVideo, encoded by moviepy.

Any env that renders ``rgb_array`` works: classic control (CartPole's 600x400 frames), Atari (the
full-colour 210x160 screen, one frame per agent step) and MinAtar (its 10x10 grid, scaled up).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from mpidqn.envs.presets import EnvSpec
from mpidqn.errors import UserError

INSTALL_HINT = 'pip install -e ".[video]"'
MIN_SIDE = 160  # smaller frames (MinAtar's 10x10) are scaled up to at least this many pixels


def check_video() -> None:
    """UserError naming the extra when moviepy (RecordVideo's encoder) is missing."""
    try:
        import moviepy  # noqa: F401
    except ImportError as e:
        raise UserError(f"--video needs moviepy ({e.name} is not installed): {INSTALL_HINT} (source checkout)") from None


def video_frame(frame: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """An (H, W, 3) uint8 frame an H.264 encoder takes: floats in [0, 1] scaled to 0..255, small frames
    scaled up by a whole factor (nearest pixel, so grid cells stay sharp), odd sides padded to even."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
    short = min(frame.shape[:2])
    if short < min_side:
        k = math.ceil(min_side / short)
        frame = frame.repeat(k, axis=0).repeat(k, axis=1)
    pad = [(0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)]
    return np.pad(frame, pad, mode="edge") if any(p[1] for p in pad[:2]) else frame


def video_fps(spec: EnvSpec, metadata: dict[str, Any]) -> int:
    """Frames per second of a recording, a power of two near the game's own pace: Atari plays 60 Hz with
    4 frames per agent step (15 agent steps a second: 16), MinAtar declares none (8: slow enough to
    follow), others as their metadata says (CartPole's 50: 64), else 30 (32).

    Why a power of two: moviepy writes ``int(n / fps * fps)`` frames, which floating point makes n - 1
    for some n at other rates (11 frames at 50 fps); n / 2**k * 2**k is exact, so no frame is lost."""
    if spec.preset == "atari":
        fps = 15.0
    elif spec.preset == "minatar":
        fps = 8.0
    else:
        fps = float(metadata.get("render_fps") or 30)
    return 2 ** max(0, round(math.log2(fps)))


class VideoFrames(gym.Wrapper):
    """Renders :func:`video_frame` frames."""

    def render(self) -> np.ndarray:  # type: ignore[override]
        with warnings.catch_warnings():
            # gymnasium's env checker complains about MinAtar's float frames and missing render_fps;
            # both are taken care of here (video_frame, video_fps)
            warnings.filterwarnings("ignore", message=r".*(RGB-array rendering should return|No render fps)")
            frame = self.env.render()
        return video_frame(frame)


def recording_spec(spec: EnvSpec) -> EnvSpec:
    """``spec`` rendering rgb_array frames, off screen."""
    # pygame (classic control) probes a display otherwise and prints "XDG_RUNTIME_DIR is invalid" on a
    # headless node; frames drawn off screen need none. A driver the user chose is kept.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    return replace(spec, render_mode="rgb_array")


def video_prefix(env_id: str, step: int) -> str:
    """File name prefix of the videos of one checkpoint, e.g. ``CartPole-v1-step1200``."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', env_id).strip('-')}-step{step}"


def recorder(spec: EnvSpec, folder: Path, prefix: str) -> Callable[[gym.Env], gym.Env]:
    """Wraps an env of ``recording_spec(spec)`` so that every episode goes to
    ``folder/<prefix>-episode-<i>.mp4`` (one frame for the reset and one per step)."""
    def wrap(env: gym.Env) -> gym.Env:
        return gym.wrappers.RecordVideo(VideoFrames(env), str(folder), episode_trigger=lambda _: True,
                                       name_prefix=prefix, fps=video_fps(spec, env.metadata), disable_logger=True)
    return wrap


def recording(spec: EnvSpec, folder: Path, prefix: str, episodes: int
              ) -> tuple[EnvSpec, Callable[[gym.Env], gym.Env], list[Path]]:
    """What records ``episodes`` episodes of ``spec``: the spec to build, the wrapper for the built env,
    and the files it will write (episode i to ``folder/<prefix>-episode-<i>.mp4``)."""
    spec = recording_spec(spec)
    return spec, recorder(spec, folder, prefix), [folder / f"{prefix}-episode-{i}.mp4" for i in range(episodes)]
