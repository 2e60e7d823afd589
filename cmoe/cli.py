"""The ``cmoe`` command line: ``cmoe demo [...]``, ``cmoe plugins list``, ``cmoe clean DIR``, and every subcommand
a plugin registers (``cmoe unimed train|eval|analyze|demo|clean`` comes from the Uni-Med recipe this way)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmoe import leftovers
from cmoe.demo import main as demo
from cmoe.errors import CMoEError
from cmoe.plugin_manager import list_plugins
from cmoe.registry import COMMANDS


def _plugins_list(_: argparse.Namespace) -> int:
    rows = [("kind", "name", "from")] + list_plugins()
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def clean_folder(folder: str, older_than: str | None, dry_run: bool, command: str = "cmoe clean") -> int:
    """``cmoe clean DIR``: remove what interrupted saves left in `folder` and its sub-folders (their writer
    provably dead, or, with `older_than`, unknown here and untouched that long), put back what they moved aside;
    one line per leftover."""
    if not Path(folder).is_dir():
        raise CMoEError(f"{folder}: no such folder; pass the folder a run or a save wrote into")
    age = leftovers.parse_age(older_than) if older_than is not None else None
    done = leftovers.clean(folder, command=f"{command} {folder}", older_than=age, dry_run=dry_run, recursive=True,
                           log=False)
    for line in done.lines:
        print(line)
    print(done.summary(dry_run))
    return 0


def add_clean_arguments(parser: argparse.ArgumentParser, folder: str = "folder") -> None:
    """The arguments of ``cmoe clean`` (and of ``cmoe unimed clean``)."""
    parser.add_argument(folder, help="the folder to clean (a run folder, or one that holds a saved connector)")
    parser.add_argument("--older-than", metavar="AGE",
                        help="also remove leftovers this host cannot judge (written on another host, or by an "
                             "older cmoe) that nothing touched for AGE (90s, 30m, 2h, 1d): only once no save "
                             "runs into the folder")
    parser.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")


def _summary(command: object) -> str:
    doc = (getattr(command, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def main(argv: list[str] | None = None) -> int:
    """Run one command; a `CMoEError` (a plugin's included) or Ctrl-C is reported as one line, not a traceback."""
    try:
        return _main(argv)
    except CMoEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); a training run resumes from its last checkpoint when started again",
              file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="cmoe", description="Connector Mixture-of-Experts tools.")
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    commands.add_parser("demo", help="train MLP and CMoE connectors on a synthetic multi-task problem",
                        add_help=False)
    clean = commands.add_parser("clean", help="remove what interrupted saves left in a folder (temporaries of "
                                              "dead writers), put back what they moved aside")
    add_clean_arguments(clean)
    plugins = commands.add_parser("plugins", help="inspect installed plugins")
    plugins_commands = plugins.add_subparsers(dest="plugins_command", metavar="<subcommand>", required=True)
    plugins_commands.add_parser("list", help="every registered router, expert, backend, encoder, LLM, "
                                             "attacher and command, with the plugin and distribution it came from")
    for name in COMMANDS.names():
        commands.add_parser(name, help=_summary(COMMANDS.get(name)), add_help=False)
    if argv and argv[0] == "demo":
        demo(argv[1:])
        return 0
    if argv and argv[0] not in ("plugins", "-h", "--help") and argv[0] in COMMANDS:
        return int(COMMANDS.get(argv[0])(argv[1:]) or 0)
    args = parser.parse_args(argv)
    if args.command == "plugins":
        return _plugins_list(args)
    if args.command == "clean":
        return clean_folder(args.folder, args.older_than, args.dry_run)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
