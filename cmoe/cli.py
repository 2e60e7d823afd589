"""The ``cmoe`` command line: ``cmoe demo [...]``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "train MLP and CMoE connectors on a synthetic multi-task problem"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"cmoe: unknown command {argv[0]!r}; known commands: {', '.join(commands)}", file=sys.stderr)
        print("usage: cmoe <command> [options]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:<8} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "demo":
        from cmoe.demo import main as demo

        demo(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
