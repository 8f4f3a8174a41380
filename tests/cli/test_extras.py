"""A missing optional dependency is named with its extra and both ways to install it, exit 2 (issue #34)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import ROOT, run

BLOCKER = '''
import sys
BLOCKED = {blocked!r}
class Blocker:  # as if these packages were not installed
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)
sys.meta_path.insert(0, Blocker)
'''


def _without(tmp_path: Path, *modules: str) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(modules)))
    return {"PYTHONPATH": f"{hook}:{ROOT}"}


def _error_lines(p) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize("env_id, module, extra", [("ALE/Pong-v5", "ale_py", "atari"),
                                                   ("MinAtar/Breakout-v1", "minatar", "minatar")])
def test_missing_env_package_names_its_extra(tmp_path, env_id, module, extra):
    p = run([sys.executable, "-m", "mpidqn", "--run-dir", str(tmp_path / "r"), f"env.id={env_id}"],
            env=_without(tmp_path, module), timeout=120)
    assert p.returncode == 2, p.stderr
    assert _error_lines(p) == [
        f"mpidqn: error: env.id: {env_id} needs {module}, from the '{extra}' extra, which is not installed "
        f"(pip install -e '.[{extra}]' in a source checkout, or pip install 'mpidqn[{extra}]')"]


def test_report_without_pandas_exits_2_and_names_the_extra(tmp_path):
    p = run([sys.executable, "-m", "mpidqn", "report", str(tmp_path)], env=_without(tmp_path, "pandas"))
    assert p.returncode == 2, p.stderr
    assert _error_lines(p) == [
        "mpidqn report: error: report needs pandas, from the 'report' extra, which is not installed "
        "(pip install -e '.[report]' in a source checkout, or pip install 'mpidqn[report]')"]
