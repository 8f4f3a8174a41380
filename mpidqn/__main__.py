"""``python -m mpidqn``: see mpidqn.cli.main."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _unshadow() -> None:
    """Import the real package when a folder named ``mpidqn`` in the working directory hid it.

    ``python -m`` puts the working directory first on ``sys.path``. When that directory holds a
    folder ``mpidqn`` without ``__init__.py`` (a checkout, from its parent directory), Python imports
    it as a namespace package ahead of an editable install (whose import hook comes after the path
    search), and its subfolders then shadow our modules (a run folder ``runs/`` once hid a module of that name).
    This file is found in the real package all the same, so load that package from here.
    """
    pkg = sys.modules.get("mpidqn")
    if pkg is None or getattr(pkg, "__file__", None) is not None:
        return
    here = Path(__file__).resolve().parent
    for name in [m for m in sys.modules if m == "mpidqn" or m.startswith("mpidqn.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("mpidqn", here / "__init__.py", submodule_search_locations=[str(here)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mpidqn"] = module
    spec.loader.exec_module(module)


_unshadow()

from mpidqn.cli.main import main  # noqa: E402 - after the package is the real one

if __name__ == "__main__":
    sys.exit(main())
