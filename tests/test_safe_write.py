"""Atomic writes leave either the old file or the new one, never a partial one."""

from pathlib import Path

import pytest

from engine.errors import SlimscopeError
from engine.safe_write import atomic_path, atomic_write_bytes, refuse_input_overwrite


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_refuses_to_overwrite_input_model(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    with pytest.raises(SlimscopeError, match="refusing to overwrite"):
        refuse_input_overwrite(tmp_path / "." / "model.onnx", model)
    refuse_input_overwrite(tmp_path / "other.onnx", model)  # a different name is fine


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SlimscopeError, match="no such folder"):
        atomic_write_bytes(tmp_path / "absent" / "out.bin", b"x")
