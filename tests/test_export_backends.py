"""Exporting compression results of models without a torch module (ONNX graphs, weights only).

Each ONNX flavour is written from the compressed backend's own graph, reloaded in ONNX Runtime
and verified against the compressed backend; weights-only results are written as real codes
and read back to the exact floats; formats a model cannot produce are refused before writing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

import factories_export as fx
from engine.data import SyntheticData
from engine.errors import SlimscopeError
from engine.export import check_model_destination, export, resolve_format
from engine.export.safetensors_codes import CODES_KEY, read_codes
from engine.formats import load_model


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    return load_model(fx.write_conv_matmul_gemm_onnx(tmp_path_factory.mktemp("cmg")))


@pytest.fixture(scope="module")
def data(onnx_model):
    return SyntheticData(onnx_model.inputs, count=64, seed=1)


def _quantized(onnx_model, **extra):
    return fx.compressed_like_compress(
        onnx_model,
        quantize={"conv.weight": dict(bits=8, granularity="per-channel"),
                  "proj.weight": dict(bits=8, granularity="per-channel"),
                  "head.weight": dict(bits=8, granularity="per-channel")},
        **extra)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output}


def test_fp32_onnx_holds_the_compressed_weights_and_says_it_is_not_smaller(
        onnx_model, data, tmp_path) -> None:
    compressed = fx.compressed_like_compress(
        onnx_model, prune={"proj.weight": 0.5},
        quantize={"head.weight": dict(bits=4, granularity="per-channel")})
    result = export(compressed, onnx_model, tmp_path / "out.onnx", format="onnx", data=data,
                    measure=False)
    assert result.kept and result.verification.passed, result.verification.summary()
    written = onnx.load(tmp_path / "out.onnx")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    assert np.array_equal(weights["proj.weight"], compressed.backend.read("proj.weight"))
    assert (weights["proj.weight"] == 0).mean() >= 0.5
    assert {n.name for n in written.graph.node} >= set(fx.CMG_NODES)  # the user's names kept
    assert 0.9 < result.file_ratio < 1.1
    assert "x the original file" in result.headline
    assert "cannot store" in result.headline and "onnx-int8" in result.headline


def test_fp16_onnx_halves_the_file_and_says_which_form_it_chose(onnx_model, data,
                                                                 tmp_path) -> None:
    compressed = fx.compressed_like_compress(onnx_model, cast={"proj.weight": torch.float16})
    exporter, _ = resolve_format(tmp_path / "x.onnx", None, compressed, onnx_model)
    assert exporter.name == "onnx-fp16"  # a cast-only plan defaults to fp16
    result = export(compressed, onnx_model, tmp_path / "half.onnx", data=data, measure=False)
    assert result.kept and result.verification.passed, result.verification.summary()
    assert result.file_ratio < 0.6
    assert any("chosen by measurement" in note for note in result.notes), result.notes
    written = onnx.load(tmp_path / "half.onnx")
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in written.graph.initializer)


def test_int8_keeps_the_plans_float_nodes_float(onnx_model, data, tmp_path) -> None:
    compressed = _quantized(onnx_model, activation_quant={"calibration": "minmax",
                                                          "keep_float": ["head"]})
    exporter, _ = resolve_format(tmp_path / "x.onnx", None, compressed, onnx_model)
    assert exporter.name == "onnx-int8"
    result = export(compressed, onnx_model, tmp_path / "int8.onnx", data=data, measure=False)
    assert result.kept and result.verification.passed, result.verification.summary()
    graph = onnx.load(tmp_path / "int8.onnx").graph
    producers = _producers(graph)
    head = next(node for node in graph.node if node.op_type == "Gemm")
    assert head.name == "head"
    # the head reads float activations (from the Relu) and its weight as int8 codes
    assert producers[head.input[0]].op_type == "Relu"
    assert _int8_weight(graph, head.input[1])
    # ... and so does the MatMul the plan did not keep float (with int8 activations too when
    # static QDQ is chosen; weight-only int8 is chosen where that measures slower than fp32)
    proj = next(node for node in graph.node if node.op_type == "MatMul")
    assert _int8_weight(graph, proj.input[1])
    assert result.file_ratio < 0.5


def test_int8_without_keep_float_quantizes_the_head_too(onnx_model, data, tmp_path) -> None:
    """The check above can fail: without keep_float the Gemm reads int8 activations whenever
    a candidate that quantizes activations is chosen; every candidate stores it int8."""
    compressed = _quantized(onnx_model, activation_quant={"calibration": "minmax"})
    result = export(compressed, onnx_model, tmp_path / "all.onnx", format="onnx-int8",
                    data=data, measure=False)
    assert result.kept, result.verification.summary()
    graph = onnx.load(tmp_path / "all.onnx").graph
    producers = _producers(graph)
    chosen = next(note.split()[1] for note in result.notes
                  if note.startswith("int8 ") and " chosen:" in note and "not chosen" not in note)
    readers = [node for node in graph.node if node.op_type in ("Gemm", "MatMul", "QLinearMatMul",
                                                               "MatMulInteger")]
    activations_int8 = any(producers.get(name) is not None and producers[name].op_type in (
        "DequantizeLinear", "DynamicQuantizeLinear") for node in readers for name in node.input
        if not _int8_weight(graph, name))
    assert activations_int8 == (chosen != "weight_only"), chosen
    # whichever was chosen, no weight of the MatMul or the Gemm is left in float32
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                and len(t.dims) >= 2 and np.prod(t.dims) >= 256]


def _int8_weight(graph: onnx.GraphProto, name: str) -> bool:
    """Whether `name` is decoded from int8 codes: by a DequantizeLinear, or by the Cast -> Mul
    that ONNX Runtime folds at load (engine.methods.static_int8.weights_int8_everywhere)."""
    producers = _producers(graph)
    codes = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    node = producers.get(name)
    if node is not None and node.op_type == "Mul":
        node = next((producers[i] for i in node.input
                     if i in producers and producers[i].op_type == "Cast"), None)
    return node is not None and node.op_type in ("DequantizeLinear", "Cast") \
        and node.input[0] in codes


def test_dynamic_int8_honours_keep_float(onnx_model, data, tmp_path) -> None:
    compressed = _quantized(onnx_model, activation_quant={"keep_float": ["proj"]})
    result = export(compressed, onnx_model, tmp_path / "dyn.onnx", format="onnx-dynamic",
                    data=data, measure=False)
    assert result.kept, result.verification.summary()
    graph = onnx.load(tmp_path / "dyn.onnx").graph
    assert any(node.op_type == "MatMul" and node.name == "proj" for node in graph.node)
    assert any(node.op_type == "MatMulInteger" for node in graph.node)  # the head's


def test_w4_uses_matmulnbits_with_the_plans_group_size(onnx_model, data, tmp_path) -> None:
    compressed = fx.compressed_like_compress(onnx_model, quantize={
        "proj.weight": dict(bits=4, granularity="group", group_size=32)},
        transposed=("proj.weight",))
    exporter, _ = resolve_format(tmp_path / "x.onnx", None, compressed, onnx_model)
    assert exporter.name == "onnx-w4"
    result = export(compressed, onnx_model, tmp_path / "w4.onnx", data=data, measure=True)
    assert result.kept and result.verification.passed, result.verification.summary()
    graph = onnx.load(tmp_path / "w4.onnx").graph
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == 1  # proj only: the head's weights are not in the plan
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attributes["bits"] == 4 and attributes["block_size"] == 32
    assert any(node.op_type == "Gemm" for node in graph.node)
    assert result.latency_ms and result.baseline_latency_ms and result.baseline_metrics


def test_formats_an_onnx_model_cannot_produce_are_refused_before_writing(onnx_model, data,
                                                                         tmp_path) -> None:
    compressed = _quantized(onnx_model)
    for name, fmt in (("out.pt2", None), ("out.pt2", "pt2"), ("out.slim", None),
                      ("out.safetensors", "safetensors")):
        with pytest.raises(SlimscopeError) as error:
            export(compressed, onnx_model, tmp_path / name, format=fmt, data=data)
        message = str(error.value)
        assert "\n" not in message and "onnx-int8" in message, message
        assert not (tmp_path / name).exists()
        if fmt is None:  # the CLI can ask before compressing, from the model alone
            with pytest.raises(SlimscopeError, match="onnx-int8"):
                check_model_destination(tmp_path / name, fmt, onnx_model)
    check_model_destination(tmp_path / "fine.onnx", "onnx-w4", onnx_model)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def weights_model(tmp_path):
    return load_model(fx.write_weights_only(tmp_path))


def test_weights_only_codes_rebuild_the_exact_floats(weights_model, tmp_path) -> None:
    compressed = fx.compressed_like_compress(
        weights_model,
        quantize={"enc.weight": dict(bits=4, granularity="per-channel", symmetric=True),
                  "embed.weight": dict(bits=3, granularity="group", group_size=8,
                                       symmetric=False)},
        prune={"dec.weight": 0.75}, cast={"enc.bias": torch.float16})
    destination = tmp_path / "codes.safetensors"
    result = export(compressed, weights_model, destination)
    assert result.format == "safetensors-codes"
    assert result.kept and result.verification.passed, result.verification.summary()
    rebuilt = read_codes(destination)
    for key in ("embed.weight", "enc.weight", "enc.bias", "dec.weight"):
        assert np.array_equal(rebuilt[key], compressed.backend.read(key)), key
    assert (rebuilt["dec.weight"] == 0).mean() >= 0.75
    with safe_open(str(destination), framework="pt") as handle:
        table = json.loads(handle.metadata()[CODES_KEY])
        assert handle.get_tensor("enc.weight:codes").numel() == 32 * 16 // 2  # packed 4-bit
        assert handle.get_tensor("enc.bias").dtype == torch.float16
    assert table["embed.weight"]["encoding"] == "codes" and table["embed.weight"]["bits"] == 3
    assert table["dec.weight"]["encoding"] == "sparse"
    assert result.file_ratio < 0.5
    assert "x the original file" in result.headline
    reopened = load_model(destination)  # the app and CLI open it as the floats it stands for
    for key in ("embed.weight", "enc.weight", "dec.weight"):
        assert np.array_equal(reopened.tensors.get(key), compressed.backend.read(key)), key


def test_weights_only_plain_safetensors_says_it_is_not_smaller(weights_model, tmp_path) -> None:
    compressed = fx.compressed_like_compress(weights_model, quantize={
        "enc.weight": dict(bits=4, granularity="per-channel")})
    result = export(compressed, weights_model, tmp_path / "plain.safetensors",
                    format="safetensors")
    assert result.kept and result.verification.passed, result.verification.summary()
    assert result.file_ratio > 0.9
    assert "safetensors-codes" in result.headline
    with pytest.raises(SlimscopeError, match="safetensors-codes"):
        export(compressed, weights_model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_damaged_codes_table_is_one_line(weights_model, tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"w:codes": torch.zeros(4, dtype=torch.uint8)}, str(path),
              metadata={"format": "slimscope-codes", CODES_KEY: json.dumps(
                  {"w": {"shape": [10 ** 6], "dtype": "float32", "encoding": "codes",
                         "bits": 4, "code_dtype": "int8", "offset": 8, "packed": True}})})
    with pytest.raises(SlimscopeError) as error:
        read_codes(path)
    assert "\n" not in str(error.value) and "packed" in str(error.value)


def test_fp16_onnx_also_serves_torch_modules(tmp_path) -> None:
    """onnx-fp16 is graph-level: a torch-exported graph goes the same way."""
    import copy

    from engine.compressed import CompressedModel
    from engine.data import DigitsData
    from engine.demo import DEMO_MODEL

    model = load_model(DEMO_MODEL)
    compressed = CompressedModel(module=copy.deepcopy(model.module).eval())
    result = export(compressed, model, tmp_path / "demo16.onnx", format="onnx-fp16",
                    data=DigitsData("test"), measure=False)
    assert result.kept and result.verification.passed, result.verification.summary()
    assert result.size_ratio < 0.6
