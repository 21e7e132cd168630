"""Compare runs: test accuracy against epsilon spent, one line per run.

  uv run python scripts/plot_runs.py DIR [DIR ...] --out=compare.png

Epsilons share an axis only at the same delta under the same neighbouring
relation: runs whose delta or relation differ from the others' (the one most
runs share) are listed in a WARNING on stderr and left out of the plot. Runs
without DP are drawn as horizontal lines at their last test accuracy.
Prints {"png": path, "runs": n plotted, "excluded": [dirs left out]} as JSON.
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
    kept, excluded = plots.comparable(argv[1:])
    if excluded:
        print(f"WARNING: {len(excluded)} run(s) not plotted: their epsilon is at another delta or neighbouring "
              "relation, so it is not comparable:", file=sys.stderr)
        for d, why in excluded:
            print(f"  {d}: {why}", file=sys.stderr)
    png = plots.plot_runs(kept, OUT.value)
    print(json.dumps({"png": png, "runs": len(kept), "excluded": [d for d, _ in excluded]}))


if __name__ == "__main__":
    app.run(main)
