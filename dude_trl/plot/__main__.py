"""``python -m dude_trl.plot RUN_DIR [RUN_DIR ...] --out curves.png [--labels A B] [--smooth K]``.

Plots training loss, gradient norm and GSM8K accuracy of Trainer runs side by side
(`dude_trl.plot.plot_runs`). Exit status 2 with a message for a missing or unreadable run.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from .curves import plot_runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dude_trl.plot",
        description="Plot training loss, gradient norm and GSM8K accuracy of Trainer runs side by side.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Trainer output directories")
    parser.add_argument("--out", required=True, help="output image, e.g. curves.png")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: method)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window for loss and grad norm")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    try:
        path = plot_runs(args.run_dirs, args.out, labels=args.labels, smooth=args.smooth)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
