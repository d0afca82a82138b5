"""Run ``engine.cli.main`` as the hostile-corpus test's child: bounded, and measuring itself.

Usage: ``python run_cli.py RESULT_JSON AS_LIMIT_BYTES [AUDIT_LOG|-] -- ARGS...``

* an address-space limit (RLIMIT_AS) keeps a memory bomb from taking the machine: it fails
  with MemoryError instead, and the peak RSS below still tells the test it tried;
* at exit the peak resident set size (ru_maxrss, self and any children) is written to
  RESULT_JSON;
* without strace, an audit hook logs every path Python opens (resolved) to AUDIT_LOG, so the
  test can see whether a file outside the model's folder was touched. Native code (Rust,
  C++) is invisible to it, which is why the test prefers strace.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys


def _write_peak(result_path: str) -> None:
    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    with open(result_path, "w") as out:
        json.dump({"peak_rss_bytes": peak_kib * 1024}, out)


def _audit_opens(log_path: str) -> None:
    log = open(log_path, "w", buffering=1)  # opened before the hook: writes are not events
    realpath = os.path.realpath

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            try:
                path = os.fsdecode(args[0])
                log.write(realpath(path).replace("\n", "\\n") + "\n")
            except Exception:  # noqa: BLE001 - an audit hook must never break the program
                pass

    sys.addaudithook(hook)


def main() -> int:
    separator = sys.argv.index("--")
    result_path, limit, audit_log = (sys.argv[1:separator] + ["-"])[:3]
    resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
    atexit.register(_write_peak, result_path)
    if audit_log != "-":
        _audit_opens(audit_log)
    from engine.cli import main as cli_main

    return cli_main(sys.argv[separator + 1:])


if __name__ == "__main__":
    sys.exit(main())
