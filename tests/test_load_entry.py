"""The one door every model comes in by: load_model refuses what is not an ordinary file.

FIFOs, devices, /proc files, folders, missing files and impossible names each get one line,
at once, without the file being opened; names with newlines or terminal escapes never reach
the message raw; library warnings never become a second stderr line.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import factories
from engine.errors import ModelLoadError, SlimscopeError
from engine.formats import LoadOptions, check_model_path, load_model, zip_member_names

#: Generous for a stat and a raise on a busy machine; a FIFO that is opened blocks forever.
QUICK_S = 1.0


def load_error(path: Path, options: LoadOptions | None = None) -> str:
    """load_model's one-line refusal of `path` (the test fails if it loads)."""
    with pytest.raises(ModelLoadError) as raised:
        load_model(path, options)
    message = str(raised.value)
    assert message == message.strip() and "\n" not in message and "\r" not in message
    return message


def assert_printable(message: str) -> None:
    assert all(char.isprintable() for char in message), repr(message)


def test_a_fifo_is_refused_at_once_without_being_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    outcome: list[BaseException | object] = []

    def attempt() -> None:
        try:
            outcome.append(load_model(fifo))
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            outcome.append(exc)

    started = time.perf_counter()
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(QUICK_S)
    try:
        assert not worker.is_alive(), "load_model blocked on a FIFO"
    finally:
        if worker.is_alive():  # a writer end unblocks the reader stuck in open()
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(5)
    assert time.perf_counter() - started < QUICK_S
    assert len(outcome) == 1 and isinstance(outcome[0], ModelLoadError)
    assert "named pipe (FIFO)" in str(outcome[0]) and "'model.safetensors'" in str(outcome[0])


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="no /proc file system")
def test_proc_files_are_refused() -> None:
    assert "/proc or /sys file" in load_error(Path("/proc/self/mem"))


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="no /dev/null")
def test_a_device_is_refused() -> None:
    assert "is a device" in load_error(Path("/dev/null"))


def test_a_folder_and_a_missing_file_are_refused(tmp_path: Path) -> None:
    assert "is a folder" in load_error(tmp_path)
    assert "'nowhere.onnx': no such file" in load_error(tmp_path / "nowhere.onnx")


def test_a_name_longer_than_the_system_allows_says_so(tmp_path: Path) -> None:
    message = load_error(tmp_path / ("a" * 300 + ".pt"))
    assert "file name too long" in message
    assert len(message) < 160  # the name is quoted short, not echoed whole


def test_a_too_long_folder_name_inside_the_path_is_one_line(tmp_path: Path) -> None:
    assert "too long" in load_error(tmp_path / ("b" * 300) / "model.pt").lower()


def test_a_nul_byte_in_the_name_is_one_line(tmp_path: Path) -> None:
    assert "NUL byte" in load_error(tmp_path / "mo\x00del.pt")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = factories.write_onnx(tmp_path)
    path.chmod(0)
    try:
        assert "permission denied" in load_error(path)
    finally:
        path.chmod(0o600)


HOSTILE_NAME = "evil\n\x1b[31mred\x1b[0m\r.onnx"


def test_control_characters_in_a_missing_name_are_escaped(tmp_path: Path) -> None:
    message = load_error(tmp_path / HOSTILE_NAME)
    assert_printable(message)
    assert "\\n" in message and "\\x1b[31m" in message


def test_control_characters_in_a_name_are_escaped_in_adapter_messages(tmp_path: Path) -> None:
    """Adapters name the file themselves; the door escapes whatever they wrote."""
    path = tmp_path / HOSTILE_NAME
    path.write_bytes(factories.write_onnx(tmp_path).read_bytes()[:40])  # a truncated ONNX
    assert_printable(load_error(path))
    not_a_model = tmp_path / ("junk\x1b]0;title\x07" + ".bin")
    not_a_model.write_bytes(b"\x01\x02 nothing any adapter knows")
    message = load_error(not_a_model)
    assert_printable(message) and "not a model format" in message


def test_library_warnings_do_not_escape_a_load(tmp_path: Path) -> None:
    """torch warns (two lines) about pickle protocols 4 and 5; the user gets only our line."""
    path = tmp_path / "protocol5.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), path, pickle_protocol=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_model(path)
        except SlimscopeError as exc:
            assert "\n" not in str(exc)
    assert [str(w.message) for w in caught] == []


def test_check_model_path_is_the_same_refusal_without_loading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ModelLoadError, match="named pipe"):
        check_model_path(tmp_path / "pipe")
    check_model_path(factories.write_onnx(tmp_path))  # an ordinary file passes


def test_zip_member_names_of_damaged_or_foreign_files_is_empty(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(factories.write_state_dict(tmp_path).read_bytes()[:-30])
    assert zip_member_names(damaged) == []
    assert zip_member_names(factories.write_onnx(tmp_path)) == []
    names = zip_member_names(factories.write_state_dict(tmp_path))
    assert any(name.endswith("/data.pkl") for name in names)
