"""`slimscope inspect` on every format the tests can build, and a clean failure on every bad input.

Reuses the data-driven tables of tests/test_formats.py, so a new format or bad case is covered
here too. One test runs the installed console script, to prove no traceback reaches a user.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import __version__
from engine.cli import main
from engine.demo import DEMO_MODEL
from test_formats import BAD, GOOD, Bad, Good


@pytest.mark.parametrize("case", GOOD, ids=[case.id for case in GOOD])
def test_inspect_json_on_every_format(case: Good, tmp_path: Path, capsys) -> None:
    path = case.write(tmp_path)
    argv = ["inspect", str(path), "--json"]
    if case.options.trust:
        argv.append("--trust")
    if case.options.input_shape:
        argv += ["--input-shape", ",".join(map(str, case.options.input_shape))]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == case.format
    assert report["params"] == case.params
    assert [layer["name"] for layer in report["layers"]] == list(case.kinds)
    for layer in report["layers"]:
        assert {"name", "kind", "shape", "params", "dtype", "sparsity", "stats"} <= set(layer)
        assert {"min", "max", "mean", "std"} <= set(layer["stats"])
    assert report["bytes"] > 0


def test_inspect_demo_table(capsys) -> None:
    assert main(["inspect", "demo"]) == 0
    out = capsys.readouterr().out
    assert "digits_cnn.safetensors" in out and "classifier.1" in out and "Linear" in out


@pytest.mark.parametrize("case", BAD, ids=[case.id for case in BAD])
def test_inspect_fails_cleanly_on_bad_input(case: Bad, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    path = case.write(tmp_path, marker)
    argv = ["inspect", str(path)] + (["--trust"] if case.options.trust else [])
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "a pickle ran code"

    assert code == 2, err
    assert err.startswith("slimscope: error:")
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_nan_weights_inspect_with_a_warning(tmp_path: Path, capsys) -> None:
    from factories import write_nan_weights

    assert main(["inspect", str(write_nan_weights(tmp_path)), "--json"]) == 0
    captured = capsys.readouterr()
    assert "non-finite weights" in captured.err
    assert sum(json.loads(captured.out)["non_finite"].values()) == 3


def test_console_script_version_and_clean_error(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("slimscope")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]
    version = subprocess.run(command + ["--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"slimscope {__version__}"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    failed = subprocess.run(command + ["inspect", str(junk)], capture_output=True, text=True,
                            timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert DEMO_MODEL.exists()


def test_a_reader_that_stops_early_gets_no_error_line() -> None:
    """`slimscope inspect M --json | head -1`: the closed pipe is not an error to report."""
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "inspect", "demo", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert stderr == ""


def test_json_reports_parse_back_exactly_with_one_line_per_deep_value(tmp_path: Path) -> None:
    import math

    import numpy as np

    from engine.commands._common import write_json

    layers = [{"name": f"l{i}", "stats": {"mean": i / 3, "hist": [1, 2, 3]}} for i in range(3)]
    data = {"path": Path("/m.onnx"), "nan": float("nan"), "empty": {}, "none": [],
            "codes": np.arange(3), "by_bits": {4: "w4", True: 1}, "layers": layers}
    out = tmp_path / "r.json"
    write_json(data, str(out))
    text = out.read_text()
    back = json.loads(text)
    assert math.isnan(back.pop("nan"))
    assert back == {"path": "/m.onnx", "empty": {}, "none": [], "codes": [0, 1, 2],
                    "by_bits": {"4": "w4", "true": 1}, "layers": layers}
    assert text.endswith("}\n")
    layer_lines = [line for line in text.splitlines() if '"name": "l' in line]
    assert [json.loads(line.strip().rstrip(",")) for line in layer_lines] == layers
