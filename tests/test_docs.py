"""README, docs/ and flagfiles stay true to the flags the code defines."""

import glob
import os
import re

from absl import flags

import experiments.flags as dpfl_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _our_flags() -> set[str]:
    return {f.name for f in flags.FLAGS.get_key_flags_for_module(dpfl_flags)}


def test_flags_md_documents_every_flag():
    text = open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8").read()
    missing = sorted(f for f in _our_flags() if f"`--{f}`" not in text)
    assert len(_our_flags()) > 20 and missing == []


def test_flagfiles_only_use_defined_flags():
    known = _our_flags()
    cfgs = glob.glob(os.path.join(ROOT, "configs", "*.cfg"))
    assert cfgs
    for path in cfgs:
        for line in open(path, encoding="utf-8"):
            m = re.match(r"--(\w+)", line.strip())
            if m:
                name = m.group(1)
                bool_negation = name.startswith("no") and name[2:] in known
                assert name in known or bool_negation, f"{path}: unknown flag --{name}"


def test_python_example_runs(tmp_path):
    """docs/performance.md's "From Python" example runs as printed: three rounds, finite losses, no worker left."""
    import subprocess
    import sys

    from tests.conftest import worker_pids

    page = open(os.path.join(ROOT, "docs", "performance.md"), encoding="utf-8").read()
    code = re.search(r"## From Python.*?```python\n(.*?)```", page, re.S).group(1)
    before = set(worker_pids())
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert [int(r) for r, _ in lines] == [1, 2, 3]
    assert all(0 < float(loss) < 10 for _, loss in lines)
    assert set(worker_pids()) <= before
