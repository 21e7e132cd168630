"""What every driver shares on the command line: flag parsing with exit code 2, and grouped help.

absl's own parser exits 1 on a bad flag and prints a screen of usage;
`--help` lists only the flags defined in the main module (ours live in
`experiments/flags.py`) and `--helpfull` mixes them with absl's in one
alphabetical block. `run(main, groups)` replaces that:

* a usage error (unknown flag, with absl's "did you mean", a value that does
  not parse, a flagfile that cannot be read, stray arguments) prints one
  `error: ...` line and exits 2;
* `--help` (`-?`, `--helpshort`) prints the driver's flags grouped as the
  driver lists them, with their defaults, and exits 0; `--helpfull` adds the
  other flags (absl's) in a separate block at the end. Drivers import
  TensorFlow only after parsing and checking, so help and usage errors are
  fast.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Sequence

from absl import flags, logging

FlagGroups = Sequence[tuple[str, Sequence[flags.FlagHolder]]]
_HELP = ("--help", "-help", "--helpshort", "-helpshort", "-?", "-h")
_HELPFULL = ("--helpfull", "-helpfull")


def say(line: str) -> None:
    """Prints `line` on stdout, flushed; a closed stdout (its reader gone: `| head`) never ends the run.

    On the first write that fails with BrokenPipeError, stdout is pointed at
    /dev/null (as Python's documentation advises), so that no later print
    fails, nor the flush at exit, and one line on stderr says so: the run goes
    on, its progress in its files only (metrics.jsonl, summary.json).
    """
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        try:
            print("stdout is closed (BrokenPipeError): the run goes on, its progress in its files only "
                  "(metrics.jsonl, summary.json)", file=sys.stderr, flush=True)
        except OSError:
            pass


def define_once(define: Callable[..., flags.FlagHolder], name: str, default, help_text: str,
                module_name: str) -> flags.FlagHolder:
    """A flag several drivers share (e.g. --insecure_workers): defined by the first to import, shared after.

    Either way it is a key flag of `module_name` (the caller's `__name__`).
    """
    if name in flags.FLAGS:
        flags.FLAGS.register_key_flag_for_module(module_name, flags.FLAGS[name])
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
    return define(name, default, help_text, module_name=module_name)


def usage_error(message: str) -> None:
    """Prints `error: message` (one line) on stderr and exits 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def _flag_error_text(error: flags.Error) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, flags.CantOpenFlagFileError):
        # absl: "ERROR:: Unable to open flagfile: [Errno 2] No such file or directory: 'x.cfg'"
        reason = text.split("Unable to open flagfile:", 1)[-1].strip()
        return f"--flagfile: cannot read it ({reason})"
    return text


def _flagfile_of(error: flags.Error, args: Sequence[str]) -> str:
    """` (in --flagfile=F, line n)` when the flag `error` is about was read from a flagfile F of `args`, else ""."""
    name = getattr(error, "flagname", None)
    text = " ".join(str(error).split())
    if not name and isinstance(error, flags.IllegalFlagValueError) and "flag --" in text:
        name = text.split("flag --", 1)[1].split("=", 1)[0]  # absl: "flag --rounds=x: invalid literal ..."
    if not name or any(a.lstrip("-").split("=", 1)[0] in (name, f"no{name}") for a in args):
        return ""  # given on the command line
    for arg in args:
        if not arg.startswith(("--flagfile=", "-flagfile=")):
            continue
        path = arg.split("=", 1)[1]
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for n, line in enumerate(lines, 1):
            flag = line.strip().lstrip("-").split("=", 1)[0]
            if line.strip().startswith("-") and flag in (name, f"no{name}"):
                return f" (in --flagfile={path}, line {n})"
    return ""


def default_text(name: str) -> str:
    """A flag's default as --help and docs/flags.md print it."""
    value = flags.FLAGS[name].default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "empty"
    return str(value)


def markdown_tables(groups: FlagGroups) -> str:
    """docs/flags.md's tables: one `## group` section per group, a row per flag (default, help)."""
    out = []
    for title, holders in groups:
        out += [f"## {title}", "", "| flag | default | meaning, units, range |", "|---|---|---|"]
        for h in holders:
            text = " ".join(flags.FLAGS[h.name].help.split()).replace("|", "\\|")
            out.append(f"| `--{h.name}` | `{default_text(h.name)}` | {text} |")
        out.append("")
    return "\n".join(out)


def _describe(holder: flags.FlagHolder) -> str:
    flag = flags.FLAGS[holder.name]
    default = default_text(holder.name)
    kind = flag.flag_type()
    head = f"  --{flag.name} ({kind}; default: {default})"
    body = textwrap.fill(flag.help, width=100, initial_indent="      ", subsequent_indent="      ")
    return f"{head}\n{body}"


def help_text(doc: str, groups: FlagGroups, full: bool = False) -> str:
    """The driver's help: its docstring, then every flag by group."""
    lines = [(doc or "").strip(), "", "Flags (also accepted in a --flagfile, one per line):"]
    shown = set()
    for title, holders in groups:
        lines += ["", f"{title}:"]
        for h in holders:
            lines.append(_describe(h))
            shown.add(h.name)
    lines += ["", "  --flagfile: read flags from this file (one --flag=value per line; later flags override it)"]
    if full:
        others = sorted(name for name, f in flags.FLAGS._flags().items() if name == f.name and name not in shown)  # noqa: SLF001
        lines += ["", "Other flags (absl; rarely needed):"]
        for name in others:
            f = flags.FLAGS[name]
            lines.append(f"  --{name}: {' '.join(f.help.split())}")
    else:
        lines += ["", "--helpfull also lists absl's own flags."]
    return "\n".join(lines)


def check_groups(module_flags: Sequence[str], groups: FlagGroups) -> list[str]:
    """Problems with `groups`: flags of `module_flags` in no group or in two (empty: none)."""
    seen: dict[str, int] = {}
    for _, holders in groups:
        for h in holders:
            seen[h.name] = seen.get(h.name, 0) + 1
    problems = [f"--{n} is in {k} groups" for n, k in seen.items() if k > 1]
    problems += [f"--{n} is in no group" for n in module_flags if n not in seen]
    return problems


def parser_for(doc: str, groups: FlagGroups) -> Callable[[list[str]], list[str]]:
    """An absl `flags_parser`: help and usage errors as the module docstring says."""

    def parse(argv: list[str]) -> list[str]:
        args = argv[1:]
        if any(a in _HELPFULL for a in args):
            print(help_text(doc, groups, full=True))
            sys.exit(0)
        if any(a in _HELP for a in args):
            print(help_text(doc, groups))
            sys.exit(0)
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            usage_error(_flag_error_text(e) + _flagfile_of(e, args))
        if len(rest) > 1:
            usage_error(f"unexpected arguments: {' '.join(rest[1:])} (flags are written --name=value)")
        return rest

    return parse


def run(main: Callable[[list[str]], None], doc: str, groups: FlagGroups) -> None:
    """Parses the flags as above, then `sys.exit(main(argv))`, as `absl.app.run(main)` does.

    Not `app.run` itself: TensorFlow is imported only inside `main` (the instant CLI), and Keras imported
    after `app.run`'s initialisation builds functional models from plain symbolic tensors (TF 2.14: every
    `Flatten` then fails with "Attempt to convert a value (None)"). absl logging goes to stderr as under
    `app.run`.
    """
    argv = parser_for(doc, groups)(sys.argv)
    logging.use_absl_handler()
    sys.exit(main(argv))
