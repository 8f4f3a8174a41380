"""``python -m mpidqn``: see mpidqn.cli."""
from __future__ import annotations

import sys

from mpidqn.cli import main

if __name__ == "__main__":
    sys.exit(main())
