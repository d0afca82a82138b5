"""Every file Slimscope writes is guarded: never an input, refused early when it cannot be
written, renamed into place last, cleaned up when the process is killed, created with the
user's umask; and every failure is exactly one terminal-safe stderr line.

The CLI cases run the real command in a subprocess (`python -m engine.cli`), on the demo model
or copies of it in tmp_path, and check the exit code, the stderr lines and the inputs' bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main, terminal_safe
from engine.compress import compress
from engine.demo import DEMO_MODEL
from engine.errors import SlimscopeError
from engine.export import export
from engine.formats import load_model
from engine.jobs import CancelToken, Cancelled
from engine.plan import Plan
from engine.safe_write import (
    PART_SUFFIX,
    atomic_path,
    atomic_write_bytes,
    live_temps,
    remove_stale_temps,
    write_error,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_PLAN = ROOT / "resources" / "demo" / "plan_50_int8.yaml"
SMALL_PLAN = {"defaults": {"pruning": {"method": "magnitude", "amount": 0.5}}}


# -- helpers -----------------------------------------------------------------------------------
def slimscope(*args: str | Path, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SLIMSCOPE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, **popen)


def assert_one_line_refusal(run: subprocess.CompletedProcess, *expected: str) -> str:
    err = run.stderr
    assert run.returncode == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("slimscope: error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def digest(*paths: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def parts_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(PART_SUFFIX))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A model, a plan and a data file in tmp_path, copies the commands must never write."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(DEMO_MODEL.read_bytes())
    plan = tmp_path / "plan.yaml"
    plan.write_text(DEMO_PLAN.read_text())
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((8, 1, 8, 8), np.float32))
    return {"model": model, "plan": plan, "data": data}


# -- 1. no output is an input; impossible outputs refused before any work ----------------------
@pytest.mark.parametrize("case", ["report-is-model", "report-is-plan", "output-is-model"])
def test_an_input_is_never_written(case: str, inputs: dict[str, Path]) -> None:
    model, plan, data = inputs["model"], inputs["plan"], inputs["data"]
    before = digest(model, plan, data)
    out = model.parent / "out.slim"
    argv, role = {
        "report-is-model": (["compress", model, "--plan", plan, "-o", out, "--report", model],
                            "input model"),
        "report-is-plan": (["compress", model, "--plan", plan, "-o", out, "--report", plan],
                           "input plan"),
        "output-is-model": (["sensitivity", model, "--method", "datafree", "-o", model],
                            "input model"),
    }[case]
    assert_one_line_refusal(slimscope(*argv), f"refusing to overwrite the {role}")
    assert digest(model, plan, data) == before
    assert sorted(p.name for p in model.parent.iterdir()) == ["data.npz", "model.safetensors",
                                                              "plan.yaml"]


def test_inputs_by_other_names_and_impossible_outputs_are_refused(
        inputs: dict[str, Path], tmp_path: Path, capsys) -> None:
    """The same guard in-process: aliases of inputs, sensitivity results, two outputs of one
    name, folders, missing folders, /proc and devices, each one line before any work."""
    model, plan = inputs["model"], inputs["plan"]
    link = tmp_path / "link.safetensors"
    link.symlink_to(model)
    hard = tmp_path / "hard.safetensors"
    os.link(model, hard)
    sens = tmp_path / "sens.json"
    sens.write_text("{}")
    images = tmp_path / "images"
    (images / "0").mkdir(parents=True)
    data = inputs["data"]
    before = digest(model, plan, sens, data)
    out = tmp_path / "out.onnx"
    cases = {
        ("compress", str(model), "--plan", str(plan), "--data", str(data), "-o", str(out),
         "--report", str(data)): "input data",
        ("sensitivity", str(model), "--method", "datafree", "-o", str(link)): "input model",
        ("sensitivity", str(model), "--method", "datafree", "-o", str(hard)): "input model",
        ("sensitivity", str(model), "--method", "datafree",
         "-o", str(tmp_path / "." / "model.safetensors")): "input model",
        ("plan", str(model), "--sensitivity", str(sens), "--target-size", "0.5",
         "-o", str(sens)): "input sensitivity results",
        ("plan", str(model), "--sensitivity", str(sens), "--target-size", "0.5",
         "-o", str(tmp_path / "p.yaml"), "--report", str(model)): "input model",
        ("sensitivity", str(model), "--data", str(images), "-o",
         str(images / "0" / "s.json")): "inside the input data folder",
        ("compress", str(model), "--plan", str(plan), "-o", str(out),
         "--report", str(out)): "given as two different outputs",
        ("sensitivity", "demo", "--method", "datafree", "-o", str(tmp_path)): "existing folder",
        ("sensitivity", "demo", "--method", "datafree",
         "-o", str(tmp_path / "absent" / "s.json")): "no such folder",
        ("compress", "demo", "--plan", str(plan), "-o", "/proc/self/out.onnx"): "/proc",
        ("sensitivity", "demo", "--method", "datafree", "-o", "/dev/full"):
            "not a regular file",
        ("sensitivity", "demo", "--method", "datafree",
         "-o", str(tmp_path / ("x" * 300 + ".json"))): "file name too long",
    }
    for argv, expected in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and expected in err, (argv, err)
    assert digest(model, plan, sens, data) == before
    assert parts_in(tmp_path) == [] and not (tmp_path / "absent").exists()


def test_read_only_folder_is_refused_before_work(tmp_path: Path) -> None:
    """Run through the hostile corpus' wrapper, which drops root's file-permission override
    (CI runs as root, and root writes into a 0555 folder anyway)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    wrapper = ROOT / "tests" / "hostile" / "run_cli.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "HOSTILE_UNPRIVILEGED": "1"}
    env.pop("SLIMSCOPE_DEBUG", None)
    try:
        run = subprocess.run([sys.executable, str(wrapper), str(tmp_path / "peak.json"),
                              str(8 << 30), "-", "--", "sensitivity", "demo", "--method",
                              "datafree", "-o", str(folder / "s.json")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    assert not (folder / "s.json").exists()
    assert_one_line_refusal(run, "permission denied")


def test_a_failing_write_is_one_line_and_stale_parts_are_removed(tmp_path: Path) -> None:
    """A real write failure as root: a file-size limit makes write() fail with EFBIG (the path
    ENOSPC takes) after the guard has passed. The guard has already removed the .part a dead
    process left, and kept the live one's and another tool's."""
    import resource

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "sens.json"
    out.write_text("previous")
    stale = tmp_path / f".sens.json.slimscope-{dead_pid()}-0a1b2c3d.part"
    alive = tmp_path / f".sens.json.slimscope-{os.getpid()}-0a1b2c3d.part"  # this test's pid
    foreign = tmp_path / ".sens.json.other-tool.part"
    for path in (stale, alive, foreign):
        path.write_bytes(b"x" * 1000)
    run = slimscope("sensitivity", "demo", "--method", "datafree", "-o", out,
                    preexec_fn=small_files)
    assert_one_line_refusal(run, "cannot write '", "/sens.json': file too large")
    assert out.read_text() == "previous"
    assert parts_in(tmp_path) == sorted([alive.name, foreign.name])


@pytest.mark.parametrize("code, reason", [
    (errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"), (errno.ENAMETOOLONG, "file name too long"),
    (errno.EISDIR, "is a folder"), (errno.EDQUOT, "disk quota exceeded")])
def test_write_errors_map_to_one_line_with_the_quoted_path(code: int, reason: str) -> None:
    error = write_error(OSError(code, os.strerror(code)), Path("/tmp/evil\nname\x1b[2J.onnx"))
    assert isinstance(error, SlimscopeError)
    assert str(error) == f"cannot write '/tmp/evil\\nname\\x1b[2J.onnx': {reason}"


# -- 2. renamed last: a cancel at any step keeps the previous file -----------------------------
@pytest.fixture(scope="module")
def demo_compressed():
    model = load_model(DEMO_MODEL)
    compressed, _ = compress(model, Plan.from_dict(SMALL_PLAN), measure=False)
    return model, compressed


@pytest.mark.parametrize("suffix, at", [(".pt", 0.8), (".onnx", 0.8), (".pt", 0.5)])
def test_cancel_after_verification_keeps_the_previous_file(demo_compressed, tmp_path: Path,
                                                           suffix: str, at: float) -> None:
    model, compressed = demo_compressed
    destination = tmp_path / f"out{suffix}"
    destination.write_bytes(b"the previous export")
    token = CancelToken()
    seen: list[float] = []

    def cancel_late(fraction: float, message: str = "") -> None:
        seen.append(fraction)
        if fraction >= at:
            token.cancel()

    with pytest.raises(Cancelled):
        export(compressed, model, destination, progress=cancel_late, cancel=token)
    assert max(seen) >= at
    assert destination.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == [destination.name]
    assert live_temps() == []


def test_measured_export_replaces_the_file_with_umask_permissions(demo_compressed,
                                                                   tmp_path: Path) -> None:
    """Timing runs on the temp file; only then is it renamed, readable as umask allows."""
    model, compressed = demo_compressed
    destination = tmp_path / "out.pt"
    destination.write_bytes(b"the previous export")
    old_mask = os.umask(0o022)
    try:
        result = export(compressed, model, destination)
    finally:
        os.umask(old_mask)
    assert result.kept and result.latency_ms is not None and result.baseline_metrics
    assert destination.read_bytes() != b"the previous export"
    assert destination.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


# -- 3. temp files: ours by name, removed on SIGTERM and by the next run -----------------------
def test_sigterm_mid_export_removes_the_part_file(tmp_path: Path) -> None:
    destination = tmp_path / "out.onnx"
    destination.write_bytes(b"the previous export")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SLIMSCOPE_DEBUG", None)
    # The real CLI, with verification held until the signal comes: a fast machine otherwise
    # finishes the export between two looks, and the test would race the file it checks.
    held_verification = (
        "import sys, time, engine.export as export\n"
        "export.verify = lambda *args, **kwargs: time.sleep(600)\n"
        "from engine.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    child = subprocess.Popen(
        [sys.executable, "-c", held_verification, "compress", "demo", "--plan", str(DEMO_PLAN),
         "--no-measure", "-o", str(destination)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        part = _wait_for_lasting_part(tmp_path, child, within=120)
        assert f".slimscope-{child.pid}-" in part
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines() == ["slimscope: terminated by SIGTERM; temp files removed"], err
    assert parts_in(tmp_path) == []
    assert destination.read_bytes() == b"the previous export"


def _wait_for_lasting_part(folder: Path, child: subprocess.Popen, within: float) -> str:
    """The name of a .part file that is still there on two looks 0.2 s apart (the export's,
    not the guard's instant write probe)."""
    deadline = time.monotonic() + within
    previous: list[str] = []
    while time.monotonic() < deadline:
        assert child.poll() is None, f"exited before the export began: {child.stderr.read()}"
        current = parts_in(folder)
        lasting = [name for name in current if name in previous]
        if lasting:
            return lasting[0]
        previous = current
        time.sleep(0.2)
    pytest.fail("no .part file appeared")


def test_stale_parts_named_for_this_pid_but_not_live_are_removed(tmp_path: Path) -> None:
    """Pids are reused: a file named for our pid that we are not writing is a dead one's."""
    leftover = tmp_path / f".a.onnx.slimscope-{os.getpid()}-deadbeef.part"
    leftover.write_bytes(b"old")
    with atomic_path(tmp_path / "a.onnx") as temp:
        assert temp in live_temps() and not leftover.exists()
        assert remove_stale_temps(tmp_path) == []  # our live temp is not stale
        temp.write_bytes(b"new")
    assert (tmp_path / "a.onnx").read_bytes() == b"new" and parts_in(tmp_path) == []


def test_a_writer_that_makes_its_own_0600_file_still_gets_the_umask_mode(tmp_path: Path) -> None:
    """safetensors' save_file writes 0600 through a temp file of its own."""
    import torch
    from safetensors.torch import save_file

    old_mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as temp:
            save_file({"w": torch.zeros(2)}, str(temp))
    finally:
        os.umask(old_mask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_temp_file_mode_follows_the_umask(tmp_path: Path) -> None:
    old_mask = os.umask(0o002)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old_mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o664


# -- 5. one terminal-safe line, whatever the names and the libraries do ------------------------
def test_control_characters_in_names_are_escaped(tmp_path: Path) -> None:
    hostile = tmp_path / "a\nslimscope: error: fake\x1b[31m\u202e" / "s.json"
    run = slimscope("sensitivity", "demo", "--method", "datafree", "-o", hostile)
    line = assert_one_line_refusal(run, "no such folder", "\\n", "\\x1b[31m", "\\u202e")
    assert "\x1b" not in line and "\u202e" not in line


def test_library_warnings_do_not_reach_stderr(tmp_path: Path) -> None:
    """numpy warns (two lines) when data overflows float32; the run then fails on the plan."""
    data = tmp_path / "huge.npz"
    np.savez(data, x=np.full((4, 1, 8, 8), 1e300))
    plan = tmp_path / "plan.yaml"
    plan.write_text("layers:\n  no.such.layer: keep\n")
    run = slimscope("compress", "demo", "--plan", plan, "--data", data, "-o", tmp_path / "o.onnx")
    assert_one_line_refusal(run, "no.such.layer")


@pytest.mark.parametrize("text, shown", [
    ("a\nb", "a\\nb"), ("\r\x1b[2J\x07", "\\r\\x1b[2J\\x07"), ("\x9b31m", "\\x9b31m"),
    ("x\u2028y\u202ez", "x\\u2028y\\u202ez"), ("\udcff", "\\udcff"), ("naïve ok", "naïve ok")])
def test_terminal_safe(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown
    assert len(terminal_safe(text).splitlines()) == 1


def _recurse(depth: int = 0) -> int:
    return _recurse(depth + 1)


@pytest.mark.parametrize("failure, expected", [
    (_recurse, "nested too deeply"),
    (lambda: bytearray(1 << 62), "out of memory"),
    (lambda: open("/nonexistent/\x1b[2Jx"),
     "no such file or directory ('/nonexistent/\\x1b[2Jx')"),
])
def test_recursion_memory_and_os_errors_are_one_line(failure, expected: str, capsys) -> None:
    from engine.cli import _guarded

    assert _guarded(failure, debug=False) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimscope: error: ") and expected in err
    assert len(err.splitlines()) == 1 and "\x1b" not in err
