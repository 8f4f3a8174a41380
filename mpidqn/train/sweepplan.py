"""The runs of a sweep as pure data: seeds and grid parsed from the command line, expanded into
named runs (grid point x seed). No MPI, no files: unit-tested on its own."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from mpidqn.errors import UserError

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")
_UNSAFE_ENDS = re.compile(r"^[^A-Za-z0-9_.+-]+|[^A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its directory name under ``--out`` and its overrides (grid point, then
    ``seed=S`` last so the seed wins)."""

    name: str
    overrides: tuple[str, ...]
    seed: int
    point: int  # index of the grid point: runs of one point differ only in the seed


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"0,3,5"`` or ``"0-4,10"`` -> the seeds in order; repeated seeds are refused."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise UserError(f"--seeds {text}: '{part}' is not a seed or a range A-B (e.g. 0-9 or 0,3,5)")
        first, last = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if last < first:
            raise UserError(f"--seeds {text}: range {first}-{last} is empty (write the smaller seed first)")
        seeds.extend(range(first, last + 1))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"--seeds {text}: seed {repeated[0]} is given twice")
    return seeds


def split_values(text: str) -> list[str]:
    """Split ``V1,V2,...`` at the commas outside brackets, so ``[32,32],[64,64]`` is two values."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return values


def parse_grid(items: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """``KEY=V1,V2`` words -> (grid axes [(key, values)], overrides): a word with one value is the
    same in every run, so it is an ordinary override (dropped when the grid sweeps its key)."""
    axes: list[tuple[str, list[str]]] = []
    fixed: list[str] = []
    for item in items:
        key, sep, rest = item.partition("=")
        if not sep or not key:
            raise UserError(f"--grid {item}: expected KEY=V1,V2,... (e.g. train.lr=1e-3,3e-3)")
        if key == "seed":
            raise UserError(f"--grid {item}: seeds are given with --seeds, not in the grid")
        values = split_values(rest)
        if len(values) > 1 and key in [k for k, _ in axes]:
            raise UserError(f"--grid: {key} is given twice")
        if any(not v for v in values):
            raise UserError(f"--grid {item}: an empty value (two commas in a row or one at the end)")
        if len(set(values)) < len(values):
            raise UserError(f"--grid {item}: a value is given twice")
        if len(values) == 1:
            fixed.append(item)
        else:
            axes.append((key, values))
    swept = {k for k, _ in axes}
    return axes, [item for item in fixed if item.partition("=")[0] not in swept]  # the grid wins


def _safe(text: str) -> str:
    """``text`` for a file name: brackets and the like at the ends dropped, other runs of them "-"."""
    return _UNSAFE.sub("-", _UNSAFE_ENDS.sub("", text)) or "x"


def run_name(point: list[tuple[str, str]], seed: int) -> str:
    """Directory name of a run: its grid values and seed, e.g. ``train.lr-1e-3_seed0``."""
    parts = [f"{_safe(key)}-{_safe(value)}" for key, value in point]
    return "_".join([*parts, f"seed{seed}"])


def expand(axes: list[tuple[str, list[str]]], seeds: list[int]) -> list[RunSpec]:
    """Every grid point x every seed, seed-major (all points of the first seed come first), so a
    sweep cut short holds some seeds of every config rather than every seed of some."""
    points = [list(zip([k for k, _ in axes], combo)) for combo in itertools.product(*(v for _, v in axes))]
    runs = [RunSpec(run_name(point, seed), (*(f"{k}={v}" for k, v in point), f"seed={seed}"), seed, i)
            for seed in seeds for i, point in enumerate(points)]
    names = [r.name for r in runs]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        raise UserError(f"--grid: two runs would share the directory name {clash}; choose values that differ "
                        "in letters or digits")
    return runs
