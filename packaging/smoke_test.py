"""On-demand smoke test of the frozen app in dist/slimscope/ (too slow for CI's unit tests).

    .venv/bin/python packaging/smoke_test.py            # test the existing build
    .venv/bin/python packaging/smoke_test.py --build    # run packaging/build.sh first

Every run of the app gets an empty environment (only HOME, PATH=/usr/bin:/bin, LANG and, for
the GUI, DISPLAY) and a scratch working directory, so nothing from a Python environment or this
checkout can leak in. It checks ``--version`` against pyproject.toml, ``inspect demo --json``,
the bundled ONNX demo, a bad path (exit 2, one line), a real ``compress`` to int8 ONNX (torch,
onnx, onnxruntime and scikit-learn's digits, all frozen), then opens the app on the demo in a
private Xvfb, waits until its title names the demo, and saves a screenshot of the window.
This harness itself uses the build venv's PySide6 (to grab the screen) and numpy (to crop).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "dist" / "slimscope"
DEMO_TITLE = "digits_cnn.safetensors — Slimscope"
SCREEN = (1280, 800)


class SmokeFailure(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)


class App:
    """Runs the frozen executable with no Python environment around it."""

    def __init__(self, executable: Path, scratch: Path) -> None:
        self.executable = executable
        self.scratch = scratch
        (scratch / "home").mkdir(exist_ok=True)
        runtime = scratch / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        self.env = {"HOME": str(scratch / "home"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                    "XDG_RUNTIME_DIR": str(runtime)}

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = subprocess.run([str(self.executable), *args], cwd=self.scratch, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        shown = " ".join(args if len(" ".join(args)) < 90 else [*args[:2], "..."])
        print(f"  slimscope {shown}  -> exit {result.returncode} in {time.monotonic() - started:.1f} s")
        return result

    def popen(self, *args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen([str(self.executable), *args], cwd=self.scratch,
                                    env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)


# -- the command line ----------------------------------------------------------------------------
def check_cli(app: App) -> None:
    version = pyproject_version()
    result = app.run("--version", timeout=120)
    check(result.returncode == 0, f"--version failed: {result.stderr}")
    check(result.stdout.strip() == f"slimscope {version}",
          f"--version says {result.stdout.strip()!r}, pyproject says {version}")

    result = app.run("inspect", "demo", "--json")
    check(result.returncode == 0, f"inspect demo failed: {result.stderr}")
    report = json.loads(result.stdout)
    check(Path(report["path"]).resolve().is_relative_to(APP_DIR.resolve()),
          f"the demo came from {report['path']}, not from the bundle")
    check(report["format"] and report["layers"] and report["params"] > 0,
          f"an empty report: {result.stdout[:300]}")
    print(f"    demo: {report['format']}, {len(report['layers'])} layers, {report['params']} params,"
          f" macs {report.get('macs')}")

    demo_onnx = Path(report["path"]).with_name("digits_cnn.onnx")
    result = app.run("inspect", str(demo_onnx), "--json")
    check(result.returncode == 0, f"inspect of the bundled ONNX demo failed: {result.stderr}")
    onnx_report = json.loads(result.stdout)
    check(onnx_report["format"] == "onnx" and onnx_report["layers"],
          f"the ONNX demo reads as {onnx_report['format']} with {len(onnx_report['layers'])} layers")

    result = app.run("inspect", str(app.scratch / "no-such-model.pt"))
    lines = result.stderr.strip().splitlines()
    check(result.returncode == 2 and len(lines) == 1 and lines[0].startswith("slimscope: error:"),
          f"a missing file should be one error line and exit 2, got {result.returncode}: "
          f"{result.stderr}")

    plan = demo_onnx.with_name("plan_50_int8.yaml")
    out = app.scratch / "demo_small.onnx"
    result = app.run("compress", "demo", "--plan", str(plan), "-o", str(out), "--data", "demo",
                     "--report", str(app.scratch / "report.json"), timeout=600)
    check(result.returncode == 0, f"compress failed: {result.stderr}\n{result.stdout[-2000:]}")
    said = result.stdout + result.stderr  # the summary goes to stdout, progress to stderr
    check(out.is_file() and "verification passed" in said,
          f"compress wrote no verified file:\n{said[-2000:]}")
    for line in said.splitlines():
        if line.startswith(("size:", "accuracy:", "wrote", "verification")):
            print(f"    {line[:150]}")
    # The exporter reloaded the file with onnxruntime and compared outputs ("verification
    # passed"); `inspect` cannot read an int8 QDQ file back (no float weight layers), so no more.


# -- the desktop app -----------------------------------------------------------------------------
def start_xvfb() -> tuple[subprocess.Popen, str]:
    read, write = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24",
         "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    check(number.isdigit(), "Xvfb did not start")
    return xvfb, f":{number}"


def window_titles(display: str) -> list[str]:
    tree = subprocess.run(["xwininfo", "-display", display, "-root", "-tree"],
                          capture_output=True, text=True).stdout
    return re.findall(r'^\s+0x[0-9a-f]+ "(.*?)"', tree, re.M)


def window_class(display: str, title: str) -> str:
    tree = subprocess.run(["xwininfo", "-display", display, "-root", "-tree"],
                          capture_output=True, text=True).stdout
    found = re.search(r'^\s+(0x[0-9a-f]+) "' + re.escape(title) + '"', tree, re.M)
    if not found:
        return ""
    return subprocess.run(["xprop", "-display", display, "-id", found.group(1), "WM_CLASS"],
                          capture_output=True, text=True).stdout.strip()


def grab_screen(display: str, out: Path) -> tuple[int, int]:
    """Save the screen, cropped to what is not background, with the build venv's PySide6."""
    code = f"""
import numpy as np
from PySide6.QtGui import QGuiApplication, QImage
app = QGuiApplication(["grab"])
image = app.primaryScreen().grabWindow(0).toImage().convertToFormat(QImage.Format.Format_RGB32)
pixels = np.frombuffer(image.constBits(), np.uint32).reshape(image.height(), image.bytesPerLine() // 4)
ys, xs = np.nonzero(pixels[:, :image.width()] != pixels[-1, -1])
if len(xs):
    image = image.copy(int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
assert image.save({str(out)!r}), "could not save"
print(image.width(), image.height())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"})
    check(result.returncode == 0, f"could not grab the screen: {result.stderr}")
    width, height = (int(n) for n in result.stdout.split()[-2:])
    return width, height


def check_gui(app: App, screenshot: Path, timeout: float, settle: float) -> None:
    for tool in ("Xvfb", "xwininfo", "xprop"):
        check(shutil.which(tool) is not None, f"{tool} is needed for the GUI check (apt: xvfb, x11-utils)")
    xvfb, display = start_xvfb()
    log = app.scratch / "gui.log"
    process = None
    try:
        started = time.monotonic()
        process = app.popen(env={"DISPLAY": display}, log=log)  # no arguments: the app, on the demo
        while DEMO_TITLE not in window_titles(display):
            check(process.poll() is None,
                  f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            check(time.monotonic() - started < timeout,
                  f"no window titled {DEMO_TITLE!r} after {timeout:.0f} s; windows: "
                  f"{window_titles(display)}\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        print(f"  app window shows the demo {time.monotonic() - started:.1f} s after launch "
              f"({window_class(display, DEMO_TITLE)})")
        time.sleep(settle)  # histogram, statistics and the sparsity column fill in meanwhile
        check(process.poll() is None, f"the app died after opening:\n{log.read_text()[-3000:]}")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        width, height = grab_screen(display, screenshot)
        print(f"  screenshot {screenshot} ({width}x{height}) after {settle:.0f} s more")
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        xvfb.terminate()
        xvfb.wait(10)
    output = log.read_text()
    bad = [line for line in output.splitlines()
           if re.search(r"Traceback|Error|error:|cannot|Could not load", line)]
    check(not bad, "the app logged errors:\n" + "\n".join(bad[:20]))
    if output.strip():
        print("  app output (no errors):\n" + "\n".join(f"    | {line}" for line in output.splitlines()[:10]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="run packaging/build.sh first")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs/screenshots/packaged.png",
                        help="where to save the window (default: docs/screenshots/packaged.png)")
    parser.add_argument("--no-gui", action="store_true", help="skip the desktop app check")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for the window to show the demo")
    parser.add_argument("--settle", type=float, default=6, help="seconds to wait before the screenshot")
    args = parser.parse_args(argv)

    if args.build:
        subprocess.run([str(ROOT / "packaging" / "build.sh")], check=True)
    executable = APP_DIR / "slimscope"
    if not executable.is_file():
        print(f"no {executable}: run packaging/build.sh (or pass --build)", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="slimscope-smoke-") as scratch:
        app = App(executable, Path(scratch))
        try:
            print("command line:")
            check_cli(app)
            if not args.no_gui:
                print("desktop app:")
                check_gui(app, args.screenshot.resolve(), args.timeout, args.settle)
        except SmokeFailure as exc:
            print(f"SMOKE TEST FAILED: {exc}", file=sys.stderr)
            return 1
    print(f"smoke test passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
