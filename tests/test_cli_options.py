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
