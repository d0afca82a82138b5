"""The headless face: `slimscope inspect | sensitivity | plan | compress ...`; bare `slimscope` opens the GUI.

Each subcommand lives in its own module under `engine/commands/` with
``register(subparsers)``, which adds a parser whose default ``handler(args) -> int`` runs it.
Every :class:`SlimscopeError` (and an OSError, a RecursionError or a MemoryError, which hostile
or broken files cause) becomes one line on stderr and exit code 2. That line is made safe for a
terminal: control characters from file names are escaped, never echoed. Library warnings are
routed into `logging` and every log record is dropped, so they cannot add lines to stderr;
``SLIMSCOPE_DEBUG=1`` shows them (and tracebacks). SIGTERM and SIGHUP remove the temp files
being written, print one line and exit 128 + the signal number.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import unicodedata
from types import FrameType
from typing import Callable, Iterator, NoReturn, Sequence

from engine import __version__
from engine import threads as thread_policy
from engine.errors import SlimscopeError, one_line
from engine.jobs import Cancelled

#: Subcommand modules, in the order `--help` lists them.
COMMANDS = ("inspect", "sensitivity", "plan", "compress")
EXIT_USAGE = 2
EXIT_INTERNAL = 1
#: Signals that end a headless run after removing its temp files (exit 128 + the number).
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
#: Format characters that reorder or hide text on a terminal (bidirectional overrides).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                           "\u2066\u2067\u2068\u2069")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with usage errors on one terminal-safe line (argparse prints the usage first,
    and echoes arguments raw); subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {terminal_safe(message)} (see {self.prog} "
                              "--help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    for command in subparsers.choices.values():
        command.add_argument(
            "--threads", type=int, metavar="N",
            help="cores for torch and ONNX Runtime (default: OMP_NUM_THREADS, else the idle "
                 "cores; the app keeps one for itself)")
    return parser


def _run_gui(model: str | None, requested_threads: int | None = None) -> int:
    try:
        from gui.app import main as gui_main
    except ImportError as exc:
        raise SlimscopeError(f"the desktop app cannot start: {exc}") from None
    from engine.commands._common import resolve_model_path

    thread_policy.apply(thread_policy.choose(requested_threads, reserve=1))

    return gui_main([str(resolve_model_path(model))] if model else [])


def terminal_safe(text: str) -> str:
    """`text` on one line with nothing a terminal would act on: control characters (C0, DEL,
    C1, line/paragraph separators, bidi overrides, lone surrogates) become their repr escapes,
    e.g. a newline in a file name shows as ``\\n`` and ESC as ``\\x1b``."""
    return "".join(
        repr(char)[1:-1] if (unicodedata.category(char) in ("Cc", "Zl", "Zp", "Cs")
                             or char in _BIDI_CONTROLS) else char
        for char in text)


def _say(message: str) -> None:
    print(f"slimscope: {terminal_safe(message)}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list in (["--version"], ["-V"]):  # answer before the commands pull in torch
        print(f"slimscope {__version__}")
        return 0
    debug = bool(os.environ.get("SLIMSCOPE_DEBUG"))
    parsed: list[argparse.Namespace] = []
    with _quiet_libraries(debug):  # the commands' imports pull in torch and its notices
        # Guarded too: an argument's type check that fails in an unforeseen way is still one
        # line (argparse's own usage errors leave through SystemExit, exit 2, untouched).
        status = _guarded(lambda: parsed.append(build_parser().parse_args(args_list)) or 0, debug)
    if not parsed:
        return status
    args = parsed[0]
    requested_threads = getattr(args, "threads", None)
    if args.command in (None, "gui"):
        return _guarded(lambda: _run_gui(getattr(args, "model", None), requested_threads), debug)
    with _quiet_libraries(debug), _removing_temps_on_termination():
        return _guarded(lambda: _run_command(args, requested_threads), debug)


def _run_command(args: argparse.Namespace, requested_threads: int | None) -> int:
    thread_policy.apply(thread_policy.choose(requested_threads))
    return int(args.handler(args) or 0)


def _guarded(run: Callable[[], int], debug: bool) -> int:
    """Run a command; every way it can fail becomes one terminal-safe line and an exit code."""
    try:
        return run()
    except SlimscopeError as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    except Cancelled:
        _say("cancelled")
        return 130
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except RecursionError:
        if debug:
            raise
        _say("error: the input is nested too deeply to read (RecursionError)")
        return EXIT_USAGE
    except MemoryError:
        if debug:
            raise
        _say("error: out of memory: the input asks for more memory than this machine has")
        return EXIT_USAGE
    except BrokenPipeError:  # `slimscope inspect M | head`: the reader has all it wanted
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a process killed by it
    except OSError as exc:  # the environment, not a bug: a full disk, a vanished file
        if debug:
            raise
        from engine.formats.guard import quote

        where = f" ({quote(str(exc.filename))})" if exc.filename is not None else ""
        _say(f"error: {(exc.strerror or type(exc).__name__).lower()}{where}")
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line, traceback on request
        if debug:
            raise
        _say(f"internal error: {type(exc).__name__}: {one_line(exc)} "
             "(set SLIMSCOPE_DEBUG=1 to see the traceback)")
        return EXIT_INTERNAL


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush meets no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def _quiet_libraries(debug: bool) -> Iterator[None]:
    """Route warnings into `logging` and drop every record, so that no library's notice
    (numpy's overflow warning, torch's pickle-protocol warning, ORT's advice) adds lines to
    stderr, whatever the command's outcome.

    Routed rather than ``simplefilter("ignore")``: a warning and a log record are one stream
    then, and one switch (``logging.disable``) silences both, including loggers that carry
    their own stream handler (torch's). The root NullHandler also turns a library's
    ``logging.basicConfig()`` into a no-op. With `debug`, nothing is changed.
    """
    if debug:
        yield
        return
    root = logging.getLogger()
    drop = logging.NullHandler()
    root.addHandler(drop)
    disabled = logging.root.manager.disable
    logging.captureWarnings(True)
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(disabled)
        logging.captureWarnings(False)
        root.removeHandler(drop)


@contextlib.contextmanager
def _removing_temps_on_termination() -> Iterator[None]:
    """While a command runs, SIGTERM/SIGHUP remove its live temp files, print one line and exit
    128 + the signal; the unwinding that follows removes anything registered meanwhile."""
    from engine.safe_write import remove_live_temps

    def terminate(number: int, frame: FrameType | None) -> None:
        for each in TERMINATING_SIGNALS:  # a second signal now ends us without another line
            signal.signal(each, signal.SIG_DFL)
        remove_live_temps()
        _say(f"terminated by {signal.Signals(number).name}; temp files removed")
        raise SystemExit(128 + number)

    try:
        previous = {each: signal.signal(each, terminate) for each in TERMINATING_SIGNALS}
    except ValueError:  # not the main thread (main() called from a worker): leave signals be
        yield
        return
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


if __name__ == "__main__":
    sys.exit(main())
