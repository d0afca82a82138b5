"""Quantized ONNX files (ONNX Runtime's quantize_static, QDQ and QOperator): layers carry their
source layer's name and the float weight the graph computes with, codes × scale per channel;
the stored codes stay available, and a float weight written back is stored as codes again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from engine.formats import load_model
from engine.formats.onnx_format import OnnxTensorStore
from tests.factories_qdq import QDQ_INPUT, SOURCE_NAMES, write_quantized


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor)
            for tensor in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("qdq", [True, False], ids=["qdq", "qoperator"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_layers_show_float_weights_under_source_names(tmp_path: Path, qdq: bool,
                                                      per_channel: bool) -> None:
    path = write_quantized(tmp_path, per_channel=per_channel, qdq=qdq)
    model = load_model(path)
    assert tuple(model.layer_names()) == SOURCE_NAMES
    stored = _initializers(path)
    store = model.tensors
    assert isinstance(store, OnnxTensorStore)
    for layer in model.layers:
        key = layer.weight_key
        assert key.endswith("_quantized") and not layer.name.endswith("_quantized")
        codes = stored[key]
        scale = stored[key.removesuffix("_quantized") + "_scale"]
        zero_point = stored[key.removesuffix("_quantized") + "_zero_point"]
        assert codes.dtype == np.int8 and layer.dtype == "int8"  # what the file stores
        assert layer.nbytes >= codes.size  # sizes are the stored ones (1 byte per weight)
        if per_channel:
            assert scale.size > 1
            axis = 0 if layer.kind == "Conv" else 1  # output channels; a MatMul's columns
            shape = [-1 if i == axis else 1 for i in range(codes.ndim)]
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        expected = (codes.astype(np.float32) - zero_point.astype(np.float32)) * scale
        weight = model.weight(layer)
        assert weight.dtype == np.float32
        np.testing.assert_allclose(weight, expected, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(store.stored(key), codes)  # the codes, for the toggle
        assert np.abs(weight).max() < 20 < np.abs(codes).max()  # floats, not codes


def test_float_weights_written_back_are_stored_as_codes(tmp_path: Path) -> None:
    """Pruning a quantized layer zeroes its float weight; the file gets the zero point as the
    code, so the graph computes exactly zero there, and untouched codes stay the same."""
    path = write_quantized(tmp_path, per_channel=True, qdq=True)
    model = load_model(path)
    conv = model.layer("features.conv")
    weight = model.weight(conv).copy()
    weight[0] = 0.0
    backend = model.backend.with_weights({conv.weight_key: weight})
    np.testing.assert_array_equal(backend.read(conv.weight_key), weight)
    saved = tmp_path / "pruned.onnx"
    backend.save(saved)
    codes = _initializers(saved)[conv.weight_key]
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(codes[1:], _initializers(path)[conv.weight_key][1:])
    np.testing.assert_array_equal(load_model(saved).weight("features.conv"), weight)
    x = np.random.default_rng(1).standard_normal((2, *QDQ_INPUT)).astype(np.float32)
    session = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {"input": x})[0]).all()


def test_an_int8_file_is_priced_as_int8_and_not_quantized_twice(tmp_path: Path) -> None:
    """Pruning keeps the file's codes (the report prices them as 8-bit, not as the decoded
    floats: it said 1.891x for a smaller file); new codes on top of codes are refused up front."""
    from engine.compress import compress
    from engine.errors import PlanError
    from engine.plan import Plan

    model = load_model(write_quantized(tmp_path))
    _, report = compress(model, Plan.from_dict(
        {"defaults": {"pruning": {"method": "magnitude", "amount": 0.5}}}), measure=False)
    assert report.size_ratio < 1.0
    assert {layer.bits for layer in report.layers} == {8}
    with pytest.raises(PlanError, match="already stores it as integer codes"):
        compress(model, Plan.from_dict({"defaults": {"quantization": {"bits": 8}}}), measure=False)
