"""Slimscope's own int8 ONNX files open with the same layers as the fp32 file they came from.

The weight-only int8 form stores each weight as ``Mul(Cast(int8 codes), scale)`` (ONNX Runtime
folds it at load, see engine.methods.static_int8.weights_int8_everywhere); static QDQ stores
``DequantizeLinear(codes, scale)``. Either way the reopened file must list every layer under
its source name, with float values within one quantization step of the fp32 weights, and a
compression of the reopened file must write codes on the file's own scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import factories_export as fx
from engine import onnx_tools
from engine.data import SyntheticData
from engine.export import export
from engine.formats import load_model
from engine.methods.static_int8 import weights_int8_everywhere


class ConvEmbedMatmul(nn.Module):
    """A conv branch and an embedding lookup feeding one Linear: Conv, Gather and Gemm weights
    of at least MIN_INT8_ELEMENTS values each, so every one is stored int8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.table = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(image).relu().mean(dim=(2, 3))
        return self.head(pooled + self.table(tokens).mean(dim=1))


@pytest.fixture(scope="module")
def fp32_and_int8(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("reopen")
    torch.manual_seed(0)
    example = (torch.randn(2, 3, 8, 8), torch.randint(0, 64, (2, 5)))
    fp32 = onnx_tools.export_onnx(ConvEmbedMatmul().eval(), example,
                                  input_names=("image", "tokens"))
    int8, converted = weights_int8_everywhere(fp32)
    assert converted == 3
    assert {"Cast", "Mul"} <= {node.op_type for node in int8.graph.node}
    paths = folder / "fp32.onnx", folder / "int8.onnx"
    onnx.save(fp32, paths[0])
    onnx.save(int8, paths[1])
    return paths


def _steps_apart(fp32: np.ndarray, decoded: np.ndarray) -> float:
    """The largest difference in units of the coarsest per-tensor int8 step."""
    step = float(np.abs(fp32).max()) / 127.0
    return float(np.abs(fp32.astype(np.float64) - decoded).max()) / step


def test_weights_decoded_by_cast_and_mul_are_layers_under_their_names(fp32_and_int8) -> None:
    original, reopened = (load_model(path) for path in fp32_and_int8)
    assert reopened.layer_names() == original.layer_names()
    assert {"conv", "table", "head"} <= set(reopened.layer_names())
    for name in original.layer_names():
        weight, decoded = original.weight(name), reopened.weight(name)
        assert decoded.dtype == np.float32 and decoded.shape == weight.shape, name
        assert _steps_apart(weight, decoded) <= 1.0, name
    # the file's own sizes: the converted weights are int8 codes, a quarter of float32 (the
    # float biases come on top)
    for name in ("conv", "table", "head"):
        assert reopened.layer(name).dtype == "int8"
        assert reopened.layer(name).nbytes < 0.3 * original.layer(name).nbytes
    assert reopened.layer("table").kind == "Embedding"


def test_a_reopened_int8_weight_is_written_back_as_codes_on_its_scale(fp32_and_int8) -> None:
    reopened = load_model(fp32_and_int8[1])
    layer = reopened.layer("head")
    weight = reopened.weight("head")
    halved = np.where(np.abs(weight) > np.median(np.abs(weight)), weight, 0.0)
    changed = reopened.backend.with_weights({layer.weight_key: halved})
    stored = onnx.numpy_helper.to_array(changed.sites[layer.weight_key].tensor)
    assert stored.dtype == np.int8 and (stored == 0).mean() >= 0.5
    assert _steps_apart(halved, changed.read(layer.weight_key)) <= 0.5 + 1e-6


def test_an_onnx_int8_export_reopens_with_the_fp32_layers(tmp_path) -> None:
    """Whichever int8 candidate the exporter chooses (weight-only Cast/Mul or static QDQ)."""
    model = load_model(fx.write_conv_matmul_gemm_onnx(tmp_path))
    compressed = fx.compressed_like_compress(
        model, quantize={key: dict(bits=8, granularity="per-channel")
                         for key in ("conv.weight", "proj.weight", "head.weight")})
    data = SyntheticData(model.inputs, count=32, seed=3)
    result = export(compressed, model, tmp_path / "int8.onnx", format="onnx-int8", data=data,
                    measure=False)
    assert result.kept, result.verification.summary()
    reopened = load_model(tmp_path / "int8.onnx")
    assert reopened.layer_names() == model.layer_names()
    for name in model.layer_names():
        assert _steps_apart(model.weight(name), reopened.weight(name)) <= 1.0, name
