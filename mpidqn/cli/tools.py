"""Single-process tools over run dirs and checkpoints: ``evaluate`` and ``inspect``."""
from __future__ import annotations

import argparse
import json
from typing import Any

import h5py
import numpy as np
import torch

from mpidqn.algo.categorical import categorical_from_config
from mpidqn.envs.presets import spec_from_config
from mpidqn.envs.vector import make_env
from mpidqn.nn.registry import build_network
from mpidqn.train.checkpoints import Checkpoint, read_best, read_model, resolve
from mpidqn.train.evaluation import evaluate_policy


def load_policy(ckpt: Checkpoint, online: bool = False) -> tuple[Any, torch.nn.Module, str]:
    """The config and the full Q-network of a checkpoint (all pipeline stages merged) with the weights
    its evaluations used: the moving average of the parameters where the run kept one
    (train.ema_decay), else (or with ``online``) the online parameters; and which of the two it is."""
    cfg = ckpt.config()
    env = make_env(spec_from_config(cfg.env, evaluation=True))
    net = build_network(env.observation_space.shape, int(env.action_space.n), cfg.network)
    env.close()
    model = read_model(ckpt)
    average = bool(model["ema"]) and not online
    net.load_state_dict({**model["online"], **model["ema"]} if average else model["online"])
    return cfg, net.eval(), "moving average" if average else "online"


def evaluate_main(argv: list[str], parser_cls: type[argparse.ArgumentParser]) -> int:
    p = parser_cls(prog="mpidqn evaluate", description="Greedy evaluation of a run's newest checkpoint.")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's seed)")
    p.add_argument("--best", action="store_true",
                   help="the checkpoint of the run's best evaluation instead of the newest one")
    p.add_argument("--online", action="store_true",
                   help="the online parameters instead of their moving average (runs with train.ema_decay)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    ckpt = resolve(args.target, best=args.best)
    cfg, net, weights = load_policy(ckpt, online=args.online)
    torch.set_num_threads(1)

    cat = categorical_from_config(cfg.network)  # C51: act on the expected values; noisy layers: mean weights

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        out = net(torch.from_numpy(np.asarray(obs, dtype=np.float32)))
        return (out if cat is None else cat.q_values(out)).argmax(dim=1).numpy()

    seed = cfg.seed if args.seed is None else args.seed
    result = evaluate_policy(policy, spec_from_config(cfg.env, evaluation=True), args.episodes, seed, max_episode_steps=cfg.env.max_episode_steps,
                             step=ckpt.step)
    result.update(checkpoint=str(ckpt.path), env=cfg.env.id, seed=seed, weights=weights)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{cfg.env.id} @ step {ckpt.step:,} ({ckpt.path}, {weights} weights): "
              f"mean {result['mean']:.2f} ± {result['std']:.2f} "
              f"(min {result['min']:.1f}, max {result['max']:.1f}) over {result['episodes']} episodes")
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
            print(f"{k:>20}: {v}")
    return 0
