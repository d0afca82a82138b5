"""engine.data.check_data_fits: does this data fit this model (names, dtypes, shapes), asked
before any work from array headers alone, with the same verdict open_data reaches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import (
    check_data_fits,
    missing_sizes,
    open_data,
    parse_synthetic_spec,
    synthetic_spec,
)
from engine.errors import SlimscopeError
from engine.model import TensorSpec

IMAGE = [TensorSpec("pixels", ("N", 1, 8, 8))]
TEXT = [TensorSpec("input_ids", ("batch", "sequence"), "int64"),
        TensorSpec("attention_mask", ("batch", "sequence"), "int64")]


def test_synthetic_specs_carry_sizes_and_round_trip() -> None:
    spec = synthetic_spec(8, {"input_ids": (1, 16), "sr": 16000})
    assert spec == "synthetic:8;input_ids=1,16;sr=16000"
    assert parse_synthetic_spec(spec) == (8, {"input_ids": (1, 16), "sr": (16000,)})
    assert parse_synthetic_spec("synthetic") == (64, {})
    with pytest.raises(SlimscopeError):
        parse_synthetic_spec("synthetic:8;input_ids")


def test_open_sizes_are_named_once_per_axis() -> None:
    assert missing_sizes(TEXT) == [("input_ids", 1, "sequence"), ("attention_mask", 1, "sequence")]
    assert missing_sizes(IMAGE) == []


@pytest.mark.parametrize("case", ["npy-squeezed", "npy-wrong", "npz-x", "npz-float-for-int",
                                  "folder", "empty-folder", "demo", "demo-text", "synthetic-open",
                                  "synthetic-sized"])
def test_the_check_agrees_with_opening(tmp_path: Path, case: str) -> None:
    inputs, spec = IMAGE, ""
    if case == "npy-squeezed":  # 8x8 samples for a 1x8x8 input: reshaped, as the user meant
        np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), np.float32))
        spec = str(tmp_path / "a.npy")
    elif case == "npy-wrong":
        np.save(tmp_path / "a.npy", np.zeros((4, 3, 8, 8), np.float32))
        spec = str(tmp_path / "a.npy")
    elif case == "npz-x":
        np.savez(tmp_path / "a.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
        spec = str(tmp_path / "a.npz")
    elif case == "npz-float-for-int":
        inputs = TEXT
        np.savez(tmp_path / "a.npz", input_ids=np.zeros((4, 5), np.float32),
                 attention_mask=np.ones((4, 5), np.int64))
        spec = str(tmp_path / "a.npz")
    elif case in ("folder", "empty-folder"):
        (tmp_path / "cats").mkdir()
        if case == "folder":
            Image.new("L", (8, 8)).save(tmp_path / "cats" / "one.png")
        spec = str(tmp_path)
    elif case in ("demo", "demo-text"):
        inputs, spec = (IMAGE if case == "demo" else TEXT), "demo"
    else:
        inputs = TEXT
        spec = "synthetic:4" if case == "synthetic-open" else synthetic_spec(4, {"input_ids": (1, 6),
                                                                             "attention_mask": (1, 6)})
    reason = check_data_fits(inputs, spec)
    try:
        data = open_data(spec, inputs)
        next(data.batches(4))
        opened = None
    except SlimscopeError as exc:
        opened = str(exc)
    assert (reason is None) == (opened is None), (reason, opened)
    assert reason is None or "\n" not in reason
    fits = case in ("npy-squeezed", "npz-x", "folder", "demo", "synthetic-sized")
    assert (reason is None) == fits, reason
