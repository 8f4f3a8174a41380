"""Optional dependencies: which extra of pyproject.toml brings a module, and the one line that says so.

Every "not installed" message names the missing module, the extra and both ways to install it (a
source checkout or a package index), so that the advice fits however mpidqn was installed.
"""
from __future__ import annotations

EXTRA_OF = {
    "ale_py": "atari", "cv2": "atari", "minatar": "minatar", "envpool": "envpool", "Box2D": "box2d",
    "pandas": "report", "matplotlib": "report", "scipy": "report", "tqdm": "progress",
}


def install_hint(extra: str) -> str:
    """How to install ``extra``: ``pip install -e '.[atari]' in a source checkout, or ...``."""
    return f"pip install -e '.[{extra}]' in a source checkout, or pip install 'mpidqn[{extra}]'"


def missing(what: str, module: str) -> str:
    """The one line for a missing ``module``: ``{what} needs ale_py, from the 'atari' extra, which is not
    installed (pip install -e '.[atari]' in a source checkout, or pip install 'mpidqn[atari]')``."""
    top = module.split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return f"{what} needs {top}, which is not installed"
    return f"{what} needs {top}, from the '{extra}' extra, which is not installed ({install_hint(extra)})"
