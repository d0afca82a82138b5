"""One thread policy for the CLI and the app: how many cores torch and ONNX Runtime may use.

Why a policy and not the libraries' defaults: torch and ONNX Runtime each start one worker per
core, and their workers spin at every barrier waiting for the slowest member. When another
process holds a core (a second job, the app's GUI thread, a browser), a team of two on a 2-core
machine waits on its descheduled half: exact sensitivity on the demo took 8-21 s instead of
1.5 s, and recovery 176 s instead of 9 s, with one busy neighbour. So the count is chosen once
per process, in this order: an explicit ``--threads``, ``OMP_NUM_THREADS`` (the convention every
numeric library respects), else the cores idle right now, less those reserved (the app keeps
one for its event loop). Inter-op parallelism is off: our graphs are chains, and a second pool
only adds threads to compete with.
"""

from __future__ import annotations

import os
import time

from engine.errors import SlimscopeError

#: The count chosen by :func:`apply`; ONNX Runtime sessions made without an explicit count use it.
_applied: int | None = None


#: More threads than this per usable core never help, and 100,000 crash torch's OpenMP pool.
MAX_THREADS_PER_CORE = 4


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores(window_s: float = 0.05) -> float | None:
    """How many cores were idle over the last `window_s`, from two reads of /proc/stat.

    The load average would be simpler but lags by a minute; a busy neighbour that started a
    second ago is what oversubscribes us. None where /proc/stat is not there (not Linux).
    """
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(window_s)
    second = _cpu_times()
    if second is None:
        return None
    idle = second[0] - first[0]
    total = second[1] - first[1]
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * idle / total


def _cpu_times() -> tuple[int, int] | None:
    """(idle + iowait, total) jiffies over all cores, or None."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(value) for value in fields[1:9] if value.isdigit()]
    if len(values) < 5:
        return None
    return values[3] + values[4], sum(values)


def from_environment() -> int | None:
    """``OMP_NUM_THREADS`` as a positive count; None when unset or not a plain number (then the
    libraries would ignore it too)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def choose(requested: int | None = None, *, reserve: int = 0) -> int:
    """The thread count for this process's numeric work; see the module docstring for the order.

    `reserve` cores are left free (the app's GUI thread) when more than that many are usable.
    """
    cores = usable_cores()
    most = MAX_THREADS_PER_CORE * cores
    if requested is not None:
        if not 1 <= requested <= most:
            raise SlimscopeError(f"--threads must lie in 1..{most} ({MAX_THREADS_PER_CORE} per "
                                 f"usable core), not {requested}")
        return requested
    configured = from_environment()
    if configured is not None:
        return min(configured, most)  # OMP_NUM_THREADS=100000 crashed torch's thread pool
    idle = idle_cores()
    free = cores if idle is None else min(cores, max(1, int(idle + 0.5)))
    return max(1, free - reserve) if free > reserve else 1


def apply(threads: int) -> int:
    """Give torch (when loaded or loadable) and later ONNX Runtime sessions `threads`, and turn
    inter-op parallelism off. Returns `threads`."""
    global _applied
    _applied = threads
    try:
        import torch
    except ImportError:
        return threads
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only allowed before torch's first parallel work; then it stays
        pass
    return threads


def applied() -> int | None:
    """The count :func:`apply` set in this process, or None when nothing chose one."""
    return _applied
