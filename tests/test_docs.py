"""README and flagfiles stay true to the flags the code defines."""

import glob
import os
import re

from absl import flags

import experiments.flags as dpfl_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _our_flags() -> set[str]:
    return {f.name for f in flags.FLAGS.get_key_flags_for_module(dpfl_flags)}


def test_readme_documents_every_flag():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    missing = sorted(f for f in _our_flags() if f"`--{f}`" not in readme)
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
