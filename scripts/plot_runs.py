"""Compare runs: test accuracy against epsilon spent, one line per run.

  uv run python scripts/plot_runs.py DIR [DIR ...] --out=compare.png

Prints {"png": path, "runs": n} as JSON.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from dpfl_tff import plots

OUT = flags.DEFINE_string("out", "runs_compare.png", "PNG path.")


def main(argv):
    if len(argv) < 2:
        print("usage: plot_runs.py DIR [DIR ...] [--out=PATH]", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"png": plots.plot_runs(argv[1:], OUT.value), "runs": len(argv) - 1}))


if __name__ == "__main__":
    app.run(main)
