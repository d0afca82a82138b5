"""Run ``engine.cli.main`` as the hostile-corpus test's child: bounded, and measuring itself.

Usage: ``python run_cli.py RESULT_JSON AS_LIMIT_BYTES [AUDIT_LOG|-] -- ARGS...``

* an address-space limit (RLIMIT_AS) keeps a memory bomb from taking the machine: it fails
  with MemoryError instead, and the peak RSS below still tells the test it tried;
* at exit the peak resident set size (ru_maxrss, self and any children) is written to
  RESULT_JSON;
* ``HOSTILE_FILE_SIZE_LIMIT`` (bytes) sets RLIMIT_FSIZE with SIGXFSZ ignored, so a write past
  it fails with EFBIG as a full disk fails with ENOSPC;
* ``HOSTILE_UNPRIVILEGED=1`` drops root's file-permission override (CAP_DAC_OVERRIDE,
  CAP_DAC_READ_SEARCH), so an unreadable file or a read-only folder refuses root too;
* without strace, an audit hook logs every path Python opens (resolved) to AUDIT_LOG, so the
  test can see whether a file outside the model's folder was touched. Native code (Rust,
  C++) is invisible to it, which is why the test prefers strace.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import resource
import signal
import sys

_CAPABILITY_VERSION_3 = 0x20080522
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilitySet(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


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


def _drop_file_permission_override() -> None:
    """Lower this process's capabilities (always allowed) so file modes bind root as well."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapabilityHeader(_CAPABILITY_VERSION_3, 0)
    sets = (_CapabilitySet * 2)()
    if libc.capget(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    sets[0].effective &= keep
    sets[0].permitted &= keep
    sets[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _apply_case_environment() -> None:
    if limit := os.environ.pop("HOSTILE_FILE_SIZE_LIMIT", None):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    if os.environ.pop("HOSTILE_UNPRIVILEGED", None) == "1" and os.geteuid() == 0:
        _drop_file_permission_override()


def main() -> int:
    separator = sys.argv.index("--")
    result_path, limit, audit_log = (sys.argv[1:separator] + ["-"])[:3]
    resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
    atexit.register(_write_peak, result_path)
    with open(result_path, "w"):
        pass  # created before the file-size limit: the peak is written into it at exit
    _apply_case_environment()
    if audit_log != "-":
        _audit_opens(audit_log)
    from engine.cli import main as cli_main

    return cli_main(sys.argv[separator + 1:])


if __name__ == "__main__":
    sys.exit(main())
