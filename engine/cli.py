"""The headless face: `slimscope inspect | sensitivity | plan | compress ...`; bare `slimscope` opens the GUI.

Each subcommand lives in its own module under `engine/commands/` with
``register(subparsers)``, which adds a parser whose default ``handler(args) -> int`` runs it.
Every :class:`SlimscopeError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from engine import __version__
from engine.errors import SlimscopeError, one_line
from engine.jobs import Cancelled

#: Subcommand modules, in the order `--help` lists them.
COMMANDS = ("inspect", "sensitivity", "plan", "compress")
EXIT_USAGE = 2
EXIT_INTERNAL = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimscope",
        description="Inspect and compress neural networks. With no command, opens the app.",
    )
    parser.add_argument("--version", action="version", version=f"slimscope {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    gui = subparsers.add_parser("gui", help="open the desktop app (the default)")
    gui.add_argument("model", nargs="?", help="model file to open (default: the bundled demo)")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"engine.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"engine.commands.{name}":
                continue  # not built yet
            raise
        module.register(subparsers)
    return parser


def _run_gui(model: str | None) -> int:
    try:
        from gui.app import main as gui_main
    except ImportError as exc:
        raise SlimscopeError(f"the desktop app cannot start: {exc}") from None
    from engine.commands._common import resolve_model_path

    return gui_main([str(resolve_model_path(model))] if model else [])


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list in (["--version"], ["-V"]):  # answer before the commands pull in torch
        print(f"slimscope {__version__}")
        return 0
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        if args.command in (None, "gui"):
            return _run_gui(getattr(args, "model", None))
        return int(args.handler(args) or 0)
    except SlimscopeError as exc:
        print(f"slimscope: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Cancelled:
        print("slimscope: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("slimscope: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line, traceback on request
        if os.environ.get("SLIMSCOPE_DEBUG"):
            raise
        print(f"slimscope: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(set SLIMSCOPE_DEBUG=1 to see the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
