"""safetensors and ONNX files that lie about their tensors: every claim is checked before use.

Each bad file is built here, byte by byte where the libraries would refuse to write it, and
must give one line naming the tensor and the rule; good files at scale and with external data
must still load, memory-mapped, with the right numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine import zoo
from engine.cli import main
from engine.errors import FormatError, ModelLoadError
from engine.formats import load_model
from engine.stats import compute_stats, model_report

WEIGHT = np.arange(16, dtype=np.float32).reshape(4, 4) / 10


def _refused(path: Path, *fragments: str, error: type[ModelLoadError] = FormatError) -> str:
    with pytest.raises(error) as raised:
        load_model(path)
    message = str(raised.value)
    assert "\n" not in message and message == message.strip()
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- safetensors ----------------------------------------------------------------------------
def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file exactly as described, however wrong the description."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def _good_entry(**changes: object) -> dict:
    return {"fc.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64], **changes}}


@pytest.mark.parametrize(("entry", "fragments"), [
    (_good_entry(shape=[-4, -4]), ("'fc.weight'", "negative dimension")),
    (_good_entry(shape=[-1, 4]), ("'fc.weight'", "negative dimension")),
    (_good_entry(shape=[1 << 32, 1 << 32]), ("'fc.weight'", "more than any real tensor")),
    (_good_entry(shape=[4, 4.0]), ("'fc.weight'", "not an integer")),
    (_good_entry(shape=[4, 8]), ("'fc.weight'", "needs 128 bytes but 64 are stored")),
    (_good_entry(dtype="STR"), ("'fc.weight'", "dtype 'STR'")),
    (_good_entry(data_offsets=[-64, 0]), ("'fc.weight'", "negative offset")),
    (_good_entry(data_offsets=[64, 0]), ("'fc.weight'", "end before they begin")),
    (_good_entry(data_offsets=[0, 1 << 40]), ("'fc.weight'", "past the end of the file")),
    (_good_entry(data_offsets="0-64"), ("'fc.weight'", "not two integers")),
], ids=["negative", "minus-one", "overflow", "float-dim", "short-data", "string-dtype",
        "negative-offset", "reversed-offsets", "past-the-end", "offsets-not-a-list"])
def test_safetensors_entries_are_checked(tmp_path: Path, entry: dict,
                                         fragments: tuple[str, ...]) -> None:
    path = _safetensors(tmp_path / "bad.safetensors", entry, WEIGHT.tobytes())
    _refused(path, "bad.safetensors", *fragments)


def test_safetensors_header_claims_are_checked(tmp_path: Path) -> None:
    huge = tmp_path / "huge_header.safetensors"
    with huge.open("wb") as handle:  # sparse: 300 MB long, nothing on disk
        handle.write((200_000_000).to_bytes(8, "little") + b"{")
        handle.truncate(300_000_000)
    _refused(huge, "more than the 100000000")
    deep = tmp_path / "deep.safetensors"
    text = b"{" + b'"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    deep.write_bytes(len(text).to_bytes(8, "little") + text)
    _refused(deep, "not valid JSON")
    metadata = _safetensors(tmp_path / "metadata.safetensors",
                            {"__metadata__": {"n": 3}, **_good_entry()}, WEIGHT.tobytes())
    _refused(metadata, "__metadata__ must map strings to strings")


@pytest.mark.parametrize(("shape", "fragment"), [
    ("-1,-8", "not a list of positive integers"),
    ("1,0,8", "zero dimension"),
    ("100000,100000", "more than"),
    ("1,\n3", None),
])
def test_metadata_input_shape_must_be_positive(tmp_path: Path, shape: str,
                                               fragment: str | None) -> None:
    header = {"__metadata__": {zoo.INPUT_SHAPE_METADATA_KEY: shape}, **_good_entry()}
    path = _safetensors(tmp_path / "shape.safetensors", header, WEIGHT.tobytes())
    if fragment is None:  # whitespace between numbers is fine
        assert load_model(path).inputs[0].shape == (1, 3)
    else:
        _refused(path, zoo.INPUT_SHAPE_METADATA_KEY, fragment)


def test_many_tensors_open_as_views_of_one_map(tmp_path: Path) -> None:
    """20k tensors (a mixture-of-experts checkpoint has tens of thousands): one header parse,
    one map, and every tensor a view of it; timing lives in benchmarks/bench_hostile_scale."""
    count = 20_000
    header = {f"experts.{i}.weight": {"dtype": "F32", "shape": [2, 2],
                                      "data_offsets": [16 * i, 16 * i + 16]}
              for i in range(count)}
    values = np.arange(4 * count, dtype=np.float32)
    path = _safetensors(tmp_path / "experts.safetensors", header, values.tobytes())

    model = load_model(path)

    assert len(model.layers) == count and model.params == 4 * count
    assert model.layer_names()[:3] == ["experts.0", "experts.1", "experts.2"]
    last = model.weight(f"experts.{count - 1}")
    np.testing.assert_array_equal(last, values[-4:].reshape(2, 2))
    assert not last.flags.writeable and not last.flags.owndata  # a view of the file's map
    report = model_report(model)
    assert report["layers"][7]["stats"]["mean"] == pytest.approx(values[28:32].mean())


# -- ONNX -----------------------------------------------------------------------------------
def _onnx(folder: Path, weight: TensorProto, extra: list[TensorProto] = (),
          name: str = "bad.onnx") -> Path:
    """y = x @ W, with `weight` as W however it is described; `extra` initializers ride along."""
    weight.name = "W"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, *extra])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def _raw(dims: list[int], data: bytes, data_type: int = TensorProto.FLOAT) -> TensorProto:
    return TensorProto(data_type=data_type, dims=dims, raw_data=data)


def _external(location: str, offset: str | None = "0", length: str | None = "64",
              dims: tuple[int, ...] = (4, 4)) -> TensorProto:
    tensor = TensorProto(data_type=TensorProto.FLOAT, dims=dims,
                         data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=location)
    for key, value in (("offset", offset), ("length", length)):
        if value is not None:
            tensor.external_data.add(key=key, value=value)
    return tensor


@pytest.mark.parametrize(("tensor", "fragment"), [
    (_raw([-4, 4], WEIGHT.tobytes()), "negative dimension"),
    (_raw([-1, -16], WEIGHT.tobytes()), "negative dimension"),
    (_raw([1 << 32, 1 << 32], WEIGHT.tobytes()), "more than any real tensor"),
    (_raw([1_000_000, 1_000_000], WEIGHT.tobytes()), "needs 4000000000000 bytes but 64"),
    (_raw([4, 4], WEIGHT.tobytes()[:16]), "needs 64 bytes but 16 are stored"),
    (TensorProto(data_type=TensorProto.FLOAT, dims=[4, 4], float_data=[1.0, 2.0]),
     "needs 16 values but 2 are stored"),
    (_raw([4, 4], WEIGHT.tobytes(), data_type=999), "element type 999"),
], ids=["negative", "all-negative", "overflow", "huge-claim-short-data", "short-raw-data",
        "short-typed-data", "unknown-type"])
def test_onnx_tensors_are_checked(tmp_path: Path, tensor: TensorProto, fragment: str) -> None:
    _refused(_onnx(tmp_path, tensor), "bad.onnx", "tensor 'W'", fragment)


@pytest.mark.parametrize(("offset", "length", "fragment"), [
    ("-64", "64", "negative offset or length"),
    ("0", "-64", "negative offset or length"),
    ("4096", "64", "lies past the end of the file (64 bytes)"),
    ("99999999999999999999", "64", "lies past the end"),
    ("0x10", "64", "offset '0x10' is not an integer"),
    ("0", "32", "needs 64 bytes but its external data is 32 bytes long"),
], ids=["negative-offset", "negative-length", "offset-past-end", "huge-offset", "hex-offset",
        "length-mismatch"])
def test_onnx_external_spans_are_checked(tmp_path: Path, offset: str, length: str,
                                         fragment: str) -> None:
    (tmp_path / "w.bin").write_bytes(WEIGHT.tobytes())
    _refused(_onnx(tmp_path, _external("w.bin", offset, length)), "tensor 'W'", fragment)


@pytest.mark.parametrize("how", ["absolute", "dot-dot", "symlink", "symlinked-folder"])
def test_external_data_outside_the_models_folder_is_never_read(tmp_path: Path, how: str) -> None:
    """/etc/passwd, ../../x or a symlink out: refused before a byte is read, not shown as
    statistics. The outside file is a well-formed weight, so only the folder rule stops it."""
    folder = tmp_path / "model"
    folder.mkdir()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(WEIGHT.tobytes())
    location = {"absolute": str(outside), "dot-dot": "../secret.bin",
                "symlink": "link.bin", "symlinked-folder": "sub/secret.bin"}[how]
    if how == "symlink":
        (folder / "link.bin").symlink_to(outside)
    if how == "symlinked-folder":
        (folder / "sub").symlink_to(tmp_path)
    fragment = "is absolute" if how == "absolute" else "leads outside the model's folder"
    _refused(_onnx(folder, _external(location)), "tensor 'W'", fragment)


def test_external_data_must_be_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.bin")  # opening it would block forever
    _refused(_onnx(tmp_path, _external("pipe.bin")), "tensor 'W'", "named pipe")
    _refused(_onnx(tmp_path, _external("gone.bin")), "'gone.bin'", "missing")


def test_etc_passwd_through_the_cli_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    path = _onnx(tmp_path, _external("/etc/passwd", length=None))
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "is absolute" in captured.err
    assert "root" not in captured.err


def test_text_constants_are_left_out_not_reported_as_weights(tmp_path: Path) -> None:
    """STRING initializers (label tables, vocabularies) cannot be weights: noted and skipped,
    never read as numbers, never counted as negative or garbage parameters."""
    labels = helper.make_tensor("labels", TensorProto.STRING, [2], [b"cat", b"dog"])
    model = load_model(_onnx(tmp_path, numpy_helper.from_array(WEIGHT), [labels]))
    assert model.layer_names() == ["W"] and model.params == 16
    assert any("'labels'" in note and "text" in note for note in model.notes)
    only_text = helper.make_tensor("W", TensorProto.STRING, [4, 4], [b"x"] * 16)
    _refused(_onnx(tmp_path, only_text, name="text.onnx"), "no weight layers",
             error=ModelLoadError)


def test_good_external_data_is_memory_mapped_with_the_right_numbers(tmp_path: Path) -> None:
    """Two tensors in one external file, the second at a non-zero offset: both mapped from
    that file, values and statistics exact."""
    rng = np.random.default_rng(0)
    first = rng.standard_normal((4, 4)).astype(np.float32)
    second = rng.standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]),
         helper.make_node("MatMul", ["h", "W2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(first, "W1"), numpy_helper.from_array(second, "W2")])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, all_tensors_to_one_file=True, location="two.bin",
              size_threshold=0)

    model = load_model(path)

    for name, expected in (("W1", first), ("W2", second)):
        weight = model.weight(name)
        assert isinstance(weight, np.memmap)
        np.testing.assert_array_equal(weight, expected)
        stats = compute_stats(weight)
        assert stats.mean == pytest.approx(expected.astype(np.float64).mean())
        assert stats.std == pytest.approx(expected.astype(np.float64).std())
    assert model.layer("W2").macs == 4 * 3
