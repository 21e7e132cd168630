"""Plot one run: test accuracy and epsilon per round.

  uv run python scripts/plot_run.py OUTPUT_DIR [--out=PATH]

Writes OUTPUT_DIR/run.png (or PATH) and prints {"png": path} as JSON.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from dpfl_tff import plots

OUT = flags.DEFINE_string("out", None, "PNG path; default OUTPUT_DIR/run.png.")


def main(argv):
    if len(argv) != 2:
        print("usage: plot_run.py OUTPUT_DIR [--out=PATH]", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"png": plots.plot_run(argv[1], OUT.value)}))


if __name__ == "__main__":
    app.run(main)
