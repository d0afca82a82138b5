"""The frozen app's entry point: the same `slimscope` as the console script.

No arguments opens the desktop app; a subcommand (``inspect``, ``compress`` ...) runs the CLI.
PyInstaller freezes this file; in a source tree, use ``slimscope`` or ``python -m engine.cli``.
"""

import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()  # a frozen child process must not start a second app
    from engine.cli import main

    sys.exit(main())
