"""``python -m mpidqn report --tensorboard RUN_DIR [RUN_DIR ...] [--out DIR]``: log.h5 -> TensorBoard events.

Needs only the ``tensorboard`` extra (not pandas or matplotlib): it reads the log with
:func:`mpidqn.io.runlog.read_log` and writes it through the same mirror a live run uses.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from mpidqn.errors import EXIT_OK, UserError

PROG = "mpidqn report"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(prog=f"{PROG} --tensorboard", description="Write the TensorBoard events of existing runs' log.h5 "
                "(RUN_DIR/tensorboard/, or OUT/<run dir name>/ with --out); view with tensorboard --logdir.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory (holds log.h5)")
    p.add_argument("--tensorboard", action="store_true", required=True, help="convert to TensorBoard events")
    p.add_argument("--out", type=Path, metavar="DIR", help="write OUT/<run dir name>/ instead of RUN_DIR/tensorboard/")
    return p.parse_args(argv)


def target(run_dir: Path, out: Path | None) -> Path:
    """Where the events of ``run_dir`` go."""
    return run_dir / "tensorboard" if out is None else out / run_dir.resolve().name


def tensorboard_main(argv: Sequence[str]) -> int:
    """Convert every run's log.h5; UserError (exit 2) for a missing extra or a run without a readable log."""
    from mpidqn.io.tensorboard import export_log, summary_writer_class

    args = parse_args(argv)
    summary_writer_class()  # the missing extra is named before any run is looked at
    for run_dir in args.run_dirs:
        log = run_dir / "log.h5"
        if not log.is_file():
            raise UserError(f"{run_dir}: no log.h5 (not a run directory)")
        try:
            out = export_log(log, target(run_dir, args.out))
        except (OSError, ValueError) as e:
            raise UserError(f"{log}: cannot read it ({str(e).splitlines()[0]})") from None
        print(f"wrote {out} (tensorboard --logdir {out})", file=sys.stdout)
    return EXIT_OK
