"""CLI options added for real models: named input shapes, the file size of packed bundles,
and progress that shows when the output is piped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.commands import _common
from engine.demo import DEMO_MODEL
from tests.factories_inputs import write_text_onnx

ROOT = Path(__file__).resolve().parents[1]
DEMO_PLAN = ROOT / "resources" / "demo" / "plan_50_int8.yaml"


def test_named_input_shapes_size_synthetic_data_for_dynamic_inputs(tmp_path: Path, capsys) -> None:
    model = write_text_onnx(tmp_path)
    out = tmp_path / "sens.json"
    assert main(["sensitivity", str(model), "--data", "synthetic:8", "--method", "exact",
                 "-o", str(out)]) == 2
    assert "--input-shape input_ids=1," in capsys.readouterr().err
    assert main(["sensitivity", str(model), "--data", "synthetic:8", "--method", "exact",
                 "--input-shape", "input_ids=1,12", "--input-shape", "attention_mask=1,12",
                 "-o", str(out)]) == 0
    assert json.loads(out.read_text())["layers"]


def test_a_bare_input_shape_still_sets_the_macs_shape(capsys) -> None:
    assert main(["inspect", "demo", "--input-shape", "2,1,8,8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"][0]["shape"][0] == 2


@pytest.mark.parametrize("text", ["=1,2", "x=", "x=0,3"])
def test_bad_named_shapes_are_refused_in_one_line(text: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's usage error: exit 2, one line
        main(["inspect", "demo", "--input-shape", text])
    assert exited.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_inspect_shows_the_packed_file_size_of_a_bundle(tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "out.slim"
    assert main(["compress", "demo", "--plan", str(DEMO_PLAN), "--no-measure",
                 "-o", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(bundle)]) == 0
    size_line = capsys.readouterr().out.splitlines()[1]
    assert f"file {_common.human_bytes(bundle.stat().st_size)}" in size_line
    assert main(["inspect", str(DEMO_MODEL)]) == 0
    assert "file" not in capsys.readouterr().out.splitlines()[1]


def test_piped_progress_prints_a_line_every_few_seconds(monkeypatch, capsys) -> None:
    monkeypatch.setattr(_common, "PIPED_PROGRESS_S", 0.0)
    _common.print_progress(0.25, "sweeping conv1")
    _common.print_progress(0.5, "sweeping conv2")
    assert capsys.readouterr().err.splitlines() == ["[25.0%] sweeping conv1",
                                                    "[50.0%] sweeping conv2"]
    monkeypatch.setattr(_common, "PIPED_PROGRESS_S", 3600.0)
    _common.print_progress(0.75, "sweeping fc")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("option", [
    ["--sparsities", "0:1:0"], ["--sparsities", "0:inf:0.1"], ["--sparsities", "0.5,nan"],
    ["--sparsities", "0:0.99:0.0000001"], ["--sparsities", "0:1e308:1e-300"],
    ["--bits", ",".join(["8"] * 1001)]])
def test_level_lists_that_are_not_numbers_or_too_long_are_usage_errors(option, capsys) -> None:
    """0:1:0 was a ZeroDivisionError traceback; 0:0.99:1e-7 asked for 9.9M levels and ran on."""
    with pytest.raises(SystemExit) as exited:
        main(["sensitivity", "demo", "--method", "datafree", "-o", "-", *option])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert len(err) < 300, err  # the value is quoted, cut to about 80 characters


@pytest.mark.parametrize("option, message", [
    (["--collapse", "-1"], "collapse fraction must lie in [0, 1]"),
    (["--collapse", "nan"], "collapse fraction must lie in [0, 1]"),
    (["--threads", "100000"], "--threads must lie in 1.."),  # was a segmentation fault
])
def test_out_of_range_sweep_settings_are_one_line(option, message: str, capsys) -> None:
    assert main(["sensitivity", "demo", "--method", "datafree", "-o", "-", *option]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_synthetic_data_is_sized_within_the_model_and_the_memory(tmp_path: Path,
                                                                 capsys) -> None:
    """A fixed axis cannot be resized, and a dynamic one cannot ask for more than half the
    memory (input_ids=1,10**9 is 64 samples of 8 GB): both one line, before allocating."""
    assert main(["sensitivity", "demo", "--data", "synthetic", "--input-shape",
                 "input=1,1,8000,8000", "-o", str(tmp_path / "a.json")]) == 2
    assert "fixes it at 8" in capsys.readouterr().err
    model = write_text_onnx(tmp_path)
    assert main(["sensitivity", str(model), "--data", "synthetic", "--input-shape",
                 f"input_ids=1,{10**9}", "--input-shape", "attention_mask=1,12",
                 "-o", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "GiB in memory" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("drop", ["nan", "inf"])
def test_a_max_drop_must_be_a_finite_number(tmp_path: Path, drop: str, capsys) -> None:
    sens = tmp_path / "sens.json"
    assert main(["sensitivity", "demo", "--method", "datafree", "-o", str(sens)]) == 0
    capsys.readouterr()
    assert main(["plan", "demo", "--sensitivity", str(sens), "--max-drop", drop,
                 "-o", str(tmp_path / "p.yaml")]) == 2
    assert "must be a finite number" in capsys.readouterr().err
