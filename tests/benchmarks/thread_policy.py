"""Thread policy under a competing load: exact sensitivity on the demo, with and without a busy
neighbour, with the libraries' default thread count and with Slimscope's policy.

    .venv/bin/python tests/benchmarks/thread_policy.py [--repeats 3]

The neighbour is one pure-Python busy loop per `--busy` (default 1), the situation the policy
is for: a second job or the app's own GUI thread holding a core. Each cell is the median wall
of the sweep's own seconds (as its JSON records them) of `slimscope sensitivity demo --method
exact` in a fresh process; "library default" is
`--threads` set to every usable core (what torch picks by itself), "policy" passes nothing.
Ratios are against the policy without load, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _spin() -> None:
    while True:
        pass


def _sensitivity_seconds(threads: int | None, output: Path) -> float:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "engine.cli", "sensitivity", "demo", "--method", "exact",
               "--no-activations", "-o", str(output)]
    if threads is not None:
        command += ["--threads", str(threads)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return float(json.loads(output.read_text())["seconds"])  # the sweep, not the start-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=1, help="busy neighbour processes")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    rows: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "sensitivity.json"
        for load in ("idle", "busy"):
            neighbours = [multiprocessing.Process(target=_spin, daemon=True)
                          for _ in range(args.busy if load == "busy" else 0)]
            for neighbour in neighbours:
                neighbour.start()
            time.sleep(0.5)  # let the neighbour show in /proc/stat
            try:
                for label, threads in (("library default", cores), ("policy", None)):
                    runs = [_sensitivity_seconds(threads, output) for _ in range(args.repeats)]
                    rows[(load, label)] = statistics.median(runs)
            finally:
                for neighbour in neighbours:
                    neighbour.terminate()
    baseline = rows[("idle", "policy")]
    print(f"{cores} usable cores, {args.busy} busy neighbour(s) under load, "
          f"median of {args.repeats}")
    print("| load | threads | exact sensitivity (s) | vs policy, idle |")
    print("|---|---|---|---|")
    for (load, label), seconds in rows.items():
        print(f"| {load} | {label} | {seconds:.2f} | {seconds / baseline:.2f}x |")


if __name__ == "__main__":
    main()
