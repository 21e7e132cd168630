"""README, docs/ and flagfiles stay true to the code: flags, defaults, commands, links, fences."""

import glob
import os
import re
import shlex

from absl import flags

import experiments.flags as dpfl_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = [README, *DOCS]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _our_flags() -> set[str]:
    return {f.name for f in flags.FLAGS.get_key_flags_for_module(dpfl_flags)}


# --- Markdown structure ----------------------------------------------------------------------------------------------

def fence_problems(text: str) -> list[str]:
    """Code fences that do not close: a closing fence is a line of bare backticks (at least as many as opened)."""
    problems, opened = [], None  # opened: (line number, number of backticks)
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if opened is None:
            if s.startswith("```"):
                opened = (i, len(s) - len(s.lstrip("`")))
            continue
        if s.startswith("```"):
            ticks = len(s) - len(s.lstrip("`"))
            if s[ticks:].strip():
                problems.append(f"line {i}: text after the closing fence of the block opened at line {opened[0]}")
            elif ticks < opened[1]:
                problems.append(f"line {i}: closing fence shorter than the one opened at line {opened[0]}")
                continue
            opened = None
        elif "```" in s:
            problems.append(f"line {i}: a fence must be on a line of its own (block opened at line {opened[0]})")
    if opened is not None:
        problems.append(f"line {opened[0]}: code fence never closed")
    return problems


def _outside_fences(text: str) -> list[str]:
    """The lines of `text` that are not inside a code block."""
    out, inside = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    return out


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block."""
    return re.findall(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, re.S | re.M)


def _inline_code(text: str) -> list[str]:
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", "\n".join(_outside_fences(text)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _outside_fences(text):
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", "\n".join(_outside_fences(text)))


def test_fence_checker_catches_the_known_mistakes():
    assert fence_problems("```python\nx = 1\n```\n") == []
    assert fence_problems("```python\nx = 1\n``` Both implementations ...\n")[0].startswith("line 3: text after")
    assert fence_problems("```sh\nls\n")[0] == "line 1: code fence never closed"
    assert fence_problems("```\na\n```\n```\n") == ["line 4: code fence never closed"]
    assert "own" in fence_problems("```\nx = 1```\n```\n")[0]


def test_every_code_fence_closes():
    problems = [f"{_rel(p)}: {msg}" for p in PAGES for msg in fence_problems(_read(p))]
    assert problems == []


def test_relative_links_and_anchors_resolve():
    assert slug("Threat model: what the epsilon covers") == "threat-model-what-the-epsilon-covers"
    assert slug("Training (FedAvg)") == "training-fedavg"
    bad = []
    for page in PAGES:
        for target in _links(_read(page)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s)://, mailto:
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(dest):
                bad.append(f"{_rel(page)}: {target}: no such file")
            elif anchor and dest.endswith(".md") and anchor not in anchors(_read(dest)):
                bad.append(f"{_rel(page)}: {target}: no heading with that anchor in {_rel(dest)}")
    assert bad == []


def test_readme_is_short_and_links_every_docs_page():
    readme = _read(README)
    assert len(readme.splitlines()) <= 250  # a guide, with the sweep study and benchmark table; details in docs/
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in _links(readme)}
    assert DOCS and sorted(set(DOCS) - linked) == []
    pages = sorted(p for p in linked if p.startswith(os.path.join(ROOT, "docs")) and p.endswith(".md"))
    assert pages == DOCS  # no link to a missing page (images under docs/images are checked with all links)


def test_layout_lists_the_files():
    """Every path in docs/layout.md exists, and every module of the package, drivers and scripts is listed."""
    block = re.search(r"## Modules\n+```\n(.*?)^```", _read(os.path.join(ROOT, "docs", "layout.md")), re.S | re.M).group(1)
    entries = [line.split()[0] for line in block.splitlines() if line.strip() and not line[0].isspace()]
    assert [e for e in entries if not os.path.exists(os.path.join(ROOT, e))] == []
    modules = [*glob.glob(os.path.join(ROOT, "dpfl_tff", "**", "*.py"), recursive=True),
               *glob.glob(os.path.join(ROOT, "experiments", "*.py")), *glob.glob(os.path.join(ROOT, "scripts", "*.py"))]
    unlisted = [_rel(m) for m in modules if os.path.basename(m) != "__init__.py"
                and _rel(m) not in entries and os.path.basename(m) not in block]
    assert modules and unlisted == []


def test_source_references_to_doc_sections_exist():
    """Error messages and comments that send the reader to a README or docs section name one that exists."""
    bad = []
    sources = [*glob.glob(os.path.join(ROOT, "dpfl_tff", "**", "*.py"), recursive=True),
               *glob.glob(os.path.join(ROOT, "experiments", "*.py")),
               *glob.glob(os.path.join(ROOT, "configs", "*.cfg")),
               *glob.glob(os.path.join(ROOT, "scripts", "*.py"))]
    for src in sources:
        text = re.sub(r"['\"]\s*\n\s*f?['\"]", "", _read(src))  # join implicitly concatenated string literals
        for doc, section in re.findall(r"(README|docs/[\w-]+\.md),? \\?\"([^\"\\]+)\\?\"", text):
            path = os.path.join(ROOT, "README.md" if doc == "README" else doc)
            if not os.path.exists(path):
                bad.append(f"{_rel(src)}: {doc} does not exist")
            elif slug(section) not in anchors(_read(path)):
                bad.append(f'{_rel(src)}: {doc} has no section "{section}"')
        for doc in re.findall(r"\b(docs/[\w-]+\.md)\b", text):
            if not os.path.exists(os.path.join(ROOT, doc)):
                bad.append(f"{_rel(src)}: {doc} does not exist")
    assert bad == []


# --- flags -----------------------------------------------------------------------------------------------------------

def _script_flags() -> set[str]:
    names = set()
    for path in glob.glob(os.path.join(ROOT, "scripts", "*.py")):
        names |= set(re.findall(r"flags\.DEFINE_\w+\(\s*\"(\w+)\"", _read(path)))
    return names


# absl's own flags that the docs mention.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "flagfile", "verbosity"}
# Flags of other programs that the docs mention, by program.
OTHER_PROGRAMS = {
    "uv": {"version", "frozen", "compile-bytecode"},
    "tensorboard": {"logdir"},
    "kubectl": {"from-file"},  # docs/several-machines.md: the credential as Kubernetes secrets
    # docs/comparison.md
    "google-research/federated differential_privacy/run_federated.py": {
        "clip", "noise_multiplier", "adaptive_clip_learning_rate", "target_unclipped_quantile", "uniform_weighting",
        "client_datasets_random_seed", "rounds_per_checkpoint"},
    "pfl-research benchmarks": {"population", "noise_cohort_size"},
    "scripts/flags_reference.py": {"write"},
}


def _driver_flags() -> dict[str, set[str]]:
    from experiments import audit, compute_epsilon, run_worker, sweep

    own = lambda module: {f.name for f in flags.FLAGS.get_key_flags_for_module(module)}  # noqa: E731
    return {
        "run_federated": _our_flags() | ABSL_FLAGS,
        "audit": _our_flags() | own(audit) | ABSL_FLAGS,
        "compute_epsilon": _our_flags() | own(compute_epsilon) | ABSL_FLAGS,
        "run_worker": own(run_worker) | ABSL_FLAGS,
        "sweep": _our_flags() | own(sweep) | ABSL_FLAGS,
    }


def _known(name: str, known: set[str]) -> bool:
    if name in known:
        return True
    base = name[2:]
    return name.startswith("no") and base in known and base in flags.FLAGS and isinstance(flags.FLAGS[base].value, bool)


def test_flags_named_in_readme_and_docs_exist():
    drivers = _driver_flags()
    ours = set().union(*drivers.values()) | _script_flags()
    others = set().union(*OTHER_PROGRAMS.values())
    unknown = []
    for page in PAGES:
        for name in re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", _read(page)):
            if not (_known(name, ours) or name in others):
                unknown.append(f"{_rel(page)}: --{name}")
    assert unknown == []


def test_flags_md_documents_every_flag():
    text = _read(os.path.join(ROOT, "docs", "flags.md"))
    missing = sorted(f for f in _our_flags() if f"`--{f}`" not in text)
    assert len(_our_flags()) > 20 and missing == []


def test_flags_md_tables_are_generated_from_the_config_fields():
    """docs/flags.md's tables are what scripts/flags_reference.py makes from the flags' one source."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flags_reference", os.path.join(ROOT, "scripts", "flags_reference.py"))
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    text = _read(os.path.join(ROOT, "docs", "flags.md"))
    assert ref.BEGIN in text and ref.END in text
    assert text == ref.rewritten(text), "run: uv run python scripts/flags_reference.py --write"


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


# --- commands --------------------------------------------------------------------------------------------------------

def _commands(text: str) -> list[tuple[str, str, str]]:
    """(driver, arguments, comment) of every `python -m experiments.<driver> ...` in code blocks and inline code."""
    lines = []
    for info, body in _code_blocks(text):
        if info.strip() in ("", "sh", "bash", "console"):
            lines += re.sub(r"\\\n\s*", " ", body).splitlines()
    lines += _inline_code(text)
    out = []
    for line in lines:
        m = re.search(r"python -m experiments\.(\w+)(.*)", line)
        if m:
            args, _, comment = m.group(2).partition(" #")
            out.append((m.group(1), args.strip(), comment.strip()))
    return out


def _parse(driver: str, argv: list[str]) -> int:
    """Parses `argv` with the driver's own parser (usage errors exit 2, --help exits 0); returns the exit code."""
    from experiments import audit, cli, compute_epsilon, run_federated, run_worker, sweep

    doc, groups = {"run_federated": (run_federated.__doc__, dpfl_flags.GROUPS),
                   "audit": (audit.__doc__, audit.GROUPS),
                   "compute_epsilon": (compute_epsilon.__doc__, compute_epsilon.GROUPS),
                   "run_worker": (run_worker.__doc__, run_worker.GROUPS),
                   "sweep": (sweep.__doc__, sweep.GROUPS)}[driver]
    try:
        cli.parser_for(doc, groups)([driver, *argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_documented_commands_parse(monkeypatch, capsys):
    """Every driver command in README and docs: known flags, an existing flagfile, values the parser and the
    configuration accept (nothing is trained). compute_epsilon commands are run, and the epsilon or noise
    multiplier their comment promises is checked."""
    import json

    from absl.testing import flagsaver

    from dpfl_tff.config import ConfigError
    from experiments import compute_epsilon

    monkeypatch.chdir(ROOT)  # flagfiles are relative to the project folder
    drivers = _driver_flags()
    seen: dict[str, int] = {}
    for page in PAGES:
        for driver, args, comment in _commands(_read(page)):
            where = f"{_rel(page)}: {driver} {args}"
            assert driver in drivers, where
            argv = shlex.split(args)
            for arg in argv:
                assert arg.startswith("--"), f"{where}: {arg!r} is not a --flag"
                name, _, value = arg[2:].partition("=")
                assert _known(name, drivers[driver]), f"{where}: --{name} is not a flag of {driver}"
                if name == "flagfile":
                    assert os.path.isfile(value), f"{where}: no flagfile {value}"
            with flagsaver.flagsaver():
                flags.FLAGS.unparse_flags()
                code = _parse(driver, argv)
                err = capsys.readouterr().err
                assert code == 0, f"{where}: exit {code}: {err}"
                if "--help" in argv:
                    continue
                if driver in ("run_federated", "sweep") and ":" not in dpfl_flags.HOLDERS["model"].value:
                    from dpfl_tff import plan

                    try:  # the privacy mode's checks too (e.g. DP-FTRL's sampling), as the driver runs them
                        plan.check(dpfl_flags.experiment_config())
                    except ConfigError as e:
                        raise AssertionError(f"{where}: {e}") from e
                if driver == "sweep":  # the grid's keys and values (each run is checked when the sweep starts)
                    from experiments import sweep as sweep_app

                    try:
                        sweep_app._axes(sweep_app.GRID.value)
                    except ConfigError as e:
                        raise AssertionError(f"{where}: {e}") from e
                if driver == "compute_epsilon":
                    try:
                        compute_epsilon.main(["compute_epsilon"])
                    except SystemExit as e:
                        raise AssertionError(f"{where}: exit {e.code}: {capsys.readouterr().err}") from e
                    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
                    for key, pattern in (("epsilon", r"epsilon (\d+\.\d+)"), ("noise_multiplier", r"z = (\d+\.\d+)")):
                        m = re.search(pattern, comment)
                        if m:
                            decimals = len(m.group(1).split(".")[1])
                            assert round(result[key], decimals) == float(m.group(1)), f"{where}: {key} {result[key]}"
            seen[driver] = seen.get(driver, 0) + 1
    assert seen.get("run_federated", 0) >= 10 and seen.get("compute_epsilon", 0) >= 4 and seen.get("run_worker"), seen


def test_flagfile_paths_in_docs_exist():
    missing = [f"{_rel(p)}: {path}" for p in PAGES for path in re.findall(r"--flagfile=([\w./-]+\.cfg)", _read(p))
               if not os.path.isfile(os.path.join(ROOT, path))]
    assert missing == []


# --- the Python example ----------------------------------------------------------------------------------------------

def test_python_example_runs(tmp_path):
    """docs/performance.md's "From Python" example runs as printed: three rounds, finite losses, no worker left."""
    import subprocess
    import sys

    from tests.conftest import worker_pids

    page = _read(os.path.join(ROOT, "docs", "performance.md"))
    code = re.search(r"## From Python.*?```python\n(.*?)```", page, re.S).group(1)
    before = set(worker_pids())
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert [int(r) for r, _ in lines] == [1, 2, 3]
    assert all(0 < float(loss) < 10 for _, loss in lines)
    assert set(worker_pids()) <= before


def test_documented_run_commands_dry_run_as_written(monkeypatch, tmp_path, capsys):
    """Every `run_federated` command of README and docs, as written from the project root, plus --dry_run (into
    a fresh --output_dir): the data is loaded, the model built and checked, the noise calibrated and the epsilon
    computed. A task whose files are not on this machine must say how to provide them; commands that need
    what a reader brings (their own module, remote workers, credentials) or the network (--download) are
    only parsed, above; so are the sweeps (their grids are checked there, each run's epsilon is the accountant's,
    tested in test_sweep)."""
    from tests.conftest import run_driver

    monkeypatch.chdir(ROOT)
    ran = 0
    for page in PAGES:
        for n, (driver, args, _) in enumerate(_commands(_read(page))):
            argv = shlex.split(args)
            if driver != "run_federated" or "--help" in argv or any(
                    a.startswith(("--workers", "--worker_credentials", "--make_credentials", "--model=my",
                                  "--task=my", "--data_dir=", "--download")) for a in argv):
                continue
            where = f"{_rel(page)}: {driver} {args}"
            code = run_driver([*argv, "--dry_run", f"--output_dir={tmp_path / f'{_rel(page)}-{n}'}"])
            out, err = capsys.readouterr()
            if code == 2 and "not found in --data_dir=" in err:  # e.g. EMNIST's files
                assert err.startswith("error: ") and "rerun with --download" in err and err.count("\n") == 1, err
                continue
            assert code == 0, f"{where}: exit {code}: {err}"
            assert "dry run: nothing is trained" in out and "epsilon" in out, f"{where}: {out}"
            ran += 1
    assert ran >= 12, ran
