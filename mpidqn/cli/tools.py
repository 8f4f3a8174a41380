"""Single-process tools over run dirs and checkpoints: ``evaluate`` and ``inspect``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py

from mpidqn.distributed.hosts import limit_threads
from mpidqn.envs.vector import check_env_module_trusted
from mpidqn.envs.video import check_video, recording, video_prefix
from mpidqn.train.checkpoints import read_best, read_model, resolve
from mpidqn.train.evaluation import evaluate_policy
from mpidqn.train.policy import Policy


def evaluate_main(argv: list[str], parser_cls: type[argparse.ArgumentParser]) -> int:
    p = parser_cls(prog="mpidqn evaluate", description="Greedy evaluation of a run's newest checkpoint.")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's seed)")
    p.add_argument("--best", action="store_true",
                   help="the checkpoint of the run's best evaluation instead of the newest one")
    p.add_argument("--online", action="store_true",
                   help="the online parameters instead of their moving average (runs with train.ema_decay)")
    p.add_argument("--video", type=Path, metavar="DIR",
                   help="record every episode to DIR/<env>-step<N>-episode-<i>.mp4 (needs the video extra)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trust-run-dir", action="store_true",
                   help="build an env whose id names a Python module to import (module:Env-v0) even if you did "
                        "not write the run (see docs/checkpoints.md, Trust model)")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.video is not None:
        check_video()
    ckpt = resolve(args.target, best=args.best)
    check_env_module_trusted(ckpt.config().env.id, f"the config of {ckpt.path}", args.trust_run_dir)
    policy = Policy.from_checkpoint(ckpt, online=args.online)
    cfg, weights = policy.config, policy.weights
    limit_threads(1)
    seed = cfg.seed if args.seed is None else args.seed
    spec, wrap, videos = policy.env_spec, None, []
    if args.video is not None:
        spec, wrap, videos = recording(spec, args.video, video_prefix(cfg.env.id, ckpt.step), args.episodes)
    result = evaluate_policy(policy.predict, spec, args.episodes, seed,
                             max_episode_steps=cfg.env.max_episode_steps, step=ckpt.step, wrap_env=wrap)
    result.update(checkpoint=str(ckpt.path), env=cfg.env.id, seed=seed, weights=weights)
    if videos:
        result["videos"] = [str(v) for v in videos]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{cfg.env.id} @ step {ckpt.step:,} ({ckpt.path}, {weights} weights): "
              f"mean {result['mean']:.2f} ± {result['std']:.2f} "
              f"(min {result['min']:.1f}, max {result['max']:.1f}) over {result['episodes']} episodes")
        if videos:
            print(f"videos: {str(videos[0]).replace('-episode-0.mp4', '-episode-*.mp4')} ({len(videos)} files)")
    return 0


def inspect_main(argv: list[str], parser_cls: type[argparse.ArgumentParser]) -> int:
    p = parser_cls(prog="mpidqn inspect", description="Describe a run's newest checkpoint (or a given one).")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    ckpt = resolve(args.target)  # verifies sizes and checksums
    cfg = ckpt.config()
    model = read_model(ckpt)
    params = int(sum(t.numel() for t in model["online"].values()))
    replay = 0
    for name in ckpt.manifest["files"]:
        if name.startswith("rank_"):
            with h5py.File(ckpt.file(name), "r") as h:
                replay += int(h["replay/ring"].attrs["size"]) if "replay" in h else 0
    info = {
        "path": str(ckpt.path), "step": ckpt.step, "world_size": ckpt.world,
        "pipeline_stages": ckpt.pipeline_stages, "complete": True, "verified": True,
        "updates": int(model["updates"]), "env": cfg.env.id, "seed": cfg.seed,
        "total_steps": cfg.train.total_steps, "network": cfg.network.hidden, "parameters": params,
        "evaluated_weights": f"moving average (train.ema_decay={cfg.train.ema_decay})" if model["ema"] else "online",
        "replay_transitions": replay, "bytes": int(sum(f["bytes"] for f in ckpt.manifest["files"].values())),
        "format_version": ckpt.manifest["format_version"], "mpidqn_version": ckpt.manifest["mpidqn_version"],
        "best": read_best(ckpt.path.parent),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>20}: {describe_best(v) if k == 'best' else v}")
    return 0


def describe_best(record: dict[str, Any] | None) -> str:
    """The BEST record as ``inspect`` prints it: ``mean 187.30 over 10 episodes at step 12,000
    (checkpoints/step_000000012000)``."""
    if record is None:
        return "none recorded (no evaluation yet)"
    where = f" (checkpoints/{record['dir']})" if record.get("dir") else ""
    return (f"mean {float(record['score']):.2f} over {int(record['episodes'])} episodes at step "
            f"{int(record['step']):,}{where}")
