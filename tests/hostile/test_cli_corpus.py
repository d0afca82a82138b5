"""The hostile corpus through the CLI: every crafted or broken input gets exit 2 and one line.

Each case runs in a fresh process (``run_cli.py``) under an address-space limit, traced with
strace when it is installed. Per case the test asserts what issue 12 asks:

* the expected exit status (2 for refusals), exactly one stderr line, no traceback, no raw
  control characters;
* no marker file (no code from the file ran);
* no file outside the model's folder opened (the case's ``outside/`` canary);
* every input byte-identical afterwards, and no ``.part`` file left behind;
* peak RSS under 1 GiB, done within 30 s.

All cases run once, two at a time, in a module fixture; each parametrized test then reports
every broken promise of its own case.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hostile.corpus import REFUSED, Case, build_corpus, case_names

#: Whole-module limit for pytest-timeout: the corpus runs in the first test's fixture.
pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parents[2]
WRAPPER = Path(__file__).with_name("run_cli.py")
TIME_LIMIT_S = 30
PEAK_RSS_LIMIT = 1 << 30
#: Address space a case may take: room for torch and ONNX Runtime, none for a bomb.
ADDRESS_SPACE_LIMIT = 6 << 30
WORKERS = 2
STRACE = shutil.which("strace")
#: strace -y shows the file a returned descriptor really is, symlinks resolved: `= 3</a/b>`.
_OPENED = re.compile(r"= (\d+)<(.*)>$")
#: A refusal that only came because the address-space limit stopped an allocation.
_OUT_OF_MEMORY = re.compile(r"MemoryError|not enough memory|can't allocate|cannot allocate",
                            re.IGNORECASE)


@dataclass
class Outcome:
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    peak_rss: int | None
    opened: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    left_behind: list[str] = field(default_factory=list)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unblock_fifos(case: Case) -> None:
    """Open each FIFO for writing and close it, so a reader stuck on it gets EOF."""
    for fifo in case.fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody is reading it: nothing to unblock


def _opened_paths(log: Path) -> list[str]:
    if not log.exists():
        return []
    opened = []
    for line in log.read_text(errors="replace").splitlines():
        if STRACE:
            match = _OPENED.search(line)
            if match:
                opened.append(match.group(2))
        elif line:
            opened.append(line)
    return opened


def run_case(case: Case) -> Outcome:
    """Run the case's command in a fresh, limited, traced process."""
    before = {path: _digest(path) for path in case.inputs}
    work = case.folder.parent / f".{case.name}.run"
    work.mkdir(exist_ok=True)
    result, log = work / "result.json", work / "opens.log"
    command = [sys.executable, str(WRAPPER), str(result), str(ADDRESS_SPACE_LIMIT),
               "-" if STRACE else str(log), "--", *case.argv]
    if STRACE:
        command = [STRACE, "-f", "-qq", "--seccomp-bpf", "-y", "-e",
                   "trace=open,openat,openat2", "-o", str(log), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SLIMSCOPE_DEBUG", None)
    if case.unprivileged:
        env["HOSTILE_UNPRIVILEGED"] = "1"
    if case.file_size_limit is not None:
        env["HOSTILE_FILE_SIZE_LIMIT"] = str(case.file_size_limit)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=case.folder, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    seconds = time.monotonic() - started
    _unblock_fifos(case)
    written = result.read_text() if result.exists() else ""  # empty: killed before its exit
    peak = json.loads(written)["peak_rss_bytes"] if written else None
    changed = [str(path) for path, digest in before.items()
               if not path.is_file() or _digest(path) != digest]
    parts = sorted(str(path) for path in case.folder.rglob("*.part"))
    return Outcome(None if timed_out else process.returncode,
                   stdout.decode(errors="backslashreplace"),
                   stderr.decode(errors="backslashreplace"), seconds, timed_out, peak,
                   _opened_paths(log), changed, parts)


def _control_characters(text: str) -> list[str]:
    return sorted({repr(char) for char in text
                   if unicodedata.category(char) == "Cc" and char not in "\n\t"})


def broken_promises(case: Case, outcome: Outcome) -> list[str]:
    """Every way `outcome` falls short of what the case must do; empty when it is fine."""
    problems = []
    if outcome.timed_out:
        problems.append(f"still running after {TIME_LIMIT_S} s (killed)")
    elif outcome.exit_code not in case.expect_exit:
        problems.append(f"exit {outcome.exit_code}, expected {' or '.join(map(str, case.expect_exit))}")
    elif outcome.seconds > TIME_LIMIT_S:
        problems.append(f"took {outcome.seconds:.1f} s")
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if outcome.exit_code == REFUSED:
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines, expected exactly one")
        elif not lines[0].startswith("slimscope: error: "):
            problems.append("the stderr line is not a 'slimscope: error:' line")
    if "internal error" in outcome.stderr:
        problems.append("an internal error")
    if _OUT_OF_MEMORY.search(outcome.stderr):
        problems.append("it ran out of memory (under the address-space limit) instead of "
                        "refusing before allocating")
    if "Traceback" in outcome.stderr:
        problems.append("a traceback on stderr")
    if bad := _control_characters(outcome.stderr):
        problems.append(f"raw control characters on stderr: {', '.join(bad)}")
    if case.marker.exists():
        problems.append("code from the file ran (the marker file was written)")
    outside = os.path.realpath(case.outside)
    reached = sorted({path for path in outcome.opened
                      if path == outside or path.startswith(outside + os.sep)})
    if reached:
        problems.append(f"opened files outside the model's folder: {reached}")
    if outcome.changed:
        problems.append(f"inputs changed: {outcome.changed}")
    if outcome.left_behind:
        problems.append(f"temporary files left behind: {outcome.left_behind}")
    if outcome.peak_rss is None:
        problems.append("no peak RSS recorded (the process did not exit normally)")
    elif outcome.peak_rss >= PEAK_RSS_LIMIT:
        problems.append(f"peak RSS {outcome.peak_rss / 2**30:.2f} GiB")
    return problems


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return build_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def outcomes(corpus: dict[str, Case]) -> dict[str, Outcome]:
    runnable = [case for case in corpus.values() if case.build_error is None]
    with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return dict(zip((case.name for case in runnable), pool.map(run_case, runnable)))


@pytest.mark.parametrize("name", case_names())
def test_hostile_input_is_refused_safely(name: str, corpus: dict[str, Case],
                                         outcomes: dict[str, Outcome]) -> None:
    case = corpus[name]
    assert case.build_error is None, f"the corpus could not build {name}:\n{case.build_error}"
    outcome = outcomes[name]
    problems = broken_promises(case, outcome)
    assert not problems, (f"{name}: " + "; ".join(problems)
                          + f"\n  argv: {case.argv}\n  exit: {outcome.exit_code} in "
                          f"{outcome.seconds:.1f} s\n  stderr: {outcome.stderr[-600:]!r}")


def test_the_corpus_covers_the_issue() -> None:
    """Guard against cases silently dropping out of the registry."""
    names = set(case_names())
    for needed in ("pt2_opaque_obj_json", "pt2_duplicate_member", "onnx_external_symlink_out",
                   "compress_report_is_model", "plan_yaml_billion_laughs", "slim_zip_bomb",
                   "model_fifo", "plan_regex_long_layer_names", "model_proc_self_mem",
                   "plan_nested_50k_json", "name_with_ansi_escape", "safetensors_10k_tensors"):
        assert needed in names
    assert len(names) >= 45


def test_the_tracer_sees_a_file_read_outside(tmp_path: Path) -> None:
    """The open-tracing itself must be able to fail: a process that reads the canary is caught."""
    case = build_corpus(tmp_path, ["control_demo_copy"])["control_demo_copy"]
    case.argv = ["inspect", str(case.canary)]  # not a model: refused, but it was opened
    outcome = run_case(case)
    assert any("opened files outside" in problem for problem in broken_promises(case, outcome))
