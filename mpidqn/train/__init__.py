"""The training loop and what it drives: run dirs, checkpoints, evaluation, stop requests, console and log rows."""
