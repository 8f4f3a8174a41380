"""mpidqn: an MPI-based HPC batch trainer for Deep Q-Learning."""
from __future__ import annotations

__version__ = "0.1.0"
