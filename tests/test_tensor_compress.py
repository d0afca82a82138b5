"""Compression of models without a torch module (ONNX, weights only), and the honesty check.

Every test builds its own small model (tests/factories_compress.py, tests/factories.py) and runs
the real path: ONNX Runtime for metrics, the registered methods for the maths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from engine.cli import main
from engine.compress import NO_GRAPH_NOTE, check_planned_changes, compress
from engine.compressed import CompressedModel
from engine.data import open_data
from engine.errors import SlimscopeError
from engine.formats import load_model
from engine.methods.quantize import quantize_tensor
from engine.model import Model
from engine.plan import Plan
from factories import write_safetensors
from factories_compress import write_conv_gemm_matmul_onnx, write_self_labelled_npz

HALF_INT8 = {"defaults": {"pruning": {"method": "magnitude", "amount": 0.5},
                          "quantization": {"bits": 8, "granularity": "per-channel"}}}


@pytest.fixture
def onnx_model(tmp_path: Path) -> tuple[Model, Path]:
    path = write_conv_gemm_matmul_onnx(tmp_path)
    return load_model(path), write_self_labelled_npz(path, tmp_path)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_onnx_half_sparse_int8_stores_what_it_reports(onnx_model, tmp_path: Path) -> None:
    model, npz = onnx_model
    file_before = model.path.read_bytes()
    originals = {layer.weight_key: model.backend.read(layer.weight_key).copy()
                 for layer in model.layers}
    compressed, report = compress(model, Plan.from_dict(HALF_INT8), open_data(str(npz), model.inputs))

    assert compressed.module is None and compressed.backend is not model.backend
    for layer in model.layers:
        key = layer.weight_key
        stored = compressed.backend.read(key)
        # exactly half of every weight is zero, and the values are what the codes decode to
        assert np.count_nonzero(stored == 0) == round(0.5 * stored.size), layer.name
        codes = compressed.quantized[key]
        assert codes.bits == 8 and codes.axis == 0 and codes.codes.dtype == torch.int8
        assert np.array_equal(stored, codes.dequantize().numpy()), layer.name
        mask = compressed.masks[key].numpy()
        assert mask[stored != 0].all() and mask.sum() == stored.size - round(0.5 * stored.size)
        # the original backend still reads the original weights
        assert np.array_equal(model.backend.read(key), originals[key])
    assert model.path.read_bytes() == file_before
    by_name = {layer.name: layer for layer in report.layers}
    assert {name: (by_name[name].sparsity, by_name[name].bits) for name in by_name} == {
        "conv": (0.5, 8), "fc": (0.5, 8), "head": (0.5, 8)}
    assert report.size_ratio < 0.2
    # metrics from ONNX Runtime on both graphs: the original is perfect on its own labels
    assert report.metrics_before["accuracy"] == 1.0
    assert 0.0 < report.metrics_after["accuracy"] < 1.0
    assert report.metrics_after["agreement"] is not None
    assert report.latency_before_ms > 0 and report.latency_after_ms > 0
    # the compressed backend's own graph holds the pruned, dequantized weights
    saved = tmp_path / "saved.onnx"
    compressed.backend.save(saved)
    assert np.array_equal(_initializers(saved)["fc.weight"], compressed.backend.read("fc.weight"))


def test_onnx_global_magnitude_nm_and_cast(onnx_model) -> None:
    model, _ = onnx_model
    plan = Plan.from_dict({
        "defaults": {"pruning": {"method": "magnitude-global", "amount": 0.6}},
        "kinds": {"Gemm": {"pruning": {"method": "nm", "pattern": "2:4"},
                           "quantization": {"bits": 4, "symmetric": False,
                                            "granularity": "group", "group_size": 64,
                                            "range": "mse"}},
                  "MatMul": {"quantization": {"bits": "fp16"}}},
    })
    compressed, report = compress(model, plan)
    conv, head = (compressed.backend.read(k) for k in ("conv.weight", "head.weight"))
    zeros = np.count_nonzero(conv == 0) + np.count_nonzero(head == 0)
    assert zeros == round(0.6 * (conv.size + head.size))  # one threshold over both layers
    fc = compressed.backend.read("fc.weight")
    assert (np.count_nonzero(fc.reshape(-1, 4), axis=1) <= 2).all()
    assert compressed.quantized["fc.weight"].bits == 4
    assert compressed.quantized["fc.weight"].group_size == 64
    assert compressed.cast == {"head.weight": torch.float16}
    assert np.array_equal(head.astype(np.float16).astype(np.float32), head)
    assert {layer.name: layer.bits for layer in report.layers} == {"conv": 32, "fc": 4, "head": 16}
    assert report.metrics_before is None  # no data given


def test_weights_only_compresses_without_data_and_says_why_no_metric(tmp_path: Path) -> None:
    model = load_model(write_safetensors(tmp_path))
    assert model.backend.name == "weights only"
    compressed, report = compress(model, Plan.from_dict(HALF_INT8))
    assert report.metrics_before is None and report.metrics_after is None
    assert NO_GRAPH_NOTE in report.notes
    stored = compressed.backend.read("fc.weight")
    assert np.count_nonzero(stored == 0) == stored.size // 2
    assert compressed.quantized["fc.weight"].bits == 8
    assert report.size_ratio < 0.5


def test_taylor_pruning_on_onnx_fails_in_one_line_before_any_work(onnx_model) -> None:
    model, _ = onnx_model
    plan = Plan.from_dict({"defaults": {"pruning": {"method": "magnitude", "amount": 0.5}},
                           "layers": {"head": {"pruning": {"method": "taylor", "amount": 0.5}}}})
    calls: list[str] = []
    with pytest.raises(SlimscopeError) as caught:
        compress(model, plan, progress=lambda fraction, message: calls.append(message))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("layer 'head': Taylor pruning is not available")
    assert model.why_not("gradients") in message
    assert calls == []  # refused before the magnitude pruning of the other layers began


def test_a_keep_layer_stays_byte_identical(onnx_model) -> None:
    model, _ = onnx_model
    plan = Plan.from_dict({**HALF_INT8, "layers": {"fc": "keep"}})
    compressed, report = compress(model, plan)
    for key in ("fc.weight", "fc.bias"):
        assert compressed.backend.read(key).tobytes() == model.backend.read(key).tobytes()
    assert {layer.name: layer.sparsity for layer in report.layers}["fc"] == 0.0
    # and a keep layer that changed is caught by the check
    tampered = compressed.backend.with_weights(
        {"fc.weight": model.backend.read("fc.weight") * 1.0001})
    changed = CompressedModel(module=None, backend=tampered, masks=compressed.masks,
                              quantized=compressed.quantized, plan=compressed.plan)
    with pytest.raises(SlimscopeError, match=r"layer 'fc': the plan asks for keep, .* changed"):
        check_planned_changes(model, changed)


def test_the_check_refuses_a_compression_that_did_not_happen(onnx_model) -> None:
    model, _ = onnx_model
    plan = Plan.from_dict(HALF_INT8)
    untouched = CompressedModel(module=None, backend=model.backend, plan=plan.to_dict())
    with pytest.raises(SlimscopeError, match=r"layer 'conv': the plan asks for sparsity 0.500 "
                                             r"\(magnitude\), but the stored weights have "
                                             r"sparsity 0.000"):
        check_planned_changes(model, untouched)
    # pruned but never quantized: the planned bits are missing
    pruned, _ = compress(model, Plan.from_dict(
        {"defaults": {"pruning": {"method": "magnitude", "amount": 0.5}}}))
    unquantized = CompressedModel(module=None, backend=pruned.backend, plan=plan.to_dict())
    with pytest.raises(SlimscopeError, match=r"layer 'conv': .* 8-bit codes, .* no codes"):
        check_planned_changes(model, unquantized)
    # codes of another width than planned
    real, _ = compress(model, plan)
    weight = torch.from_numpy(real.backend.read("conv.weight").copy())
    wrong = dict(real.quantized, **{"conv.weight": quantize_tensor(weight, 4)})
    four_bit = CompressedModel(module=None, backend=real.backend, quantized=wrong,
                               plan=plan.to_dict())
    with pytest.raises(SlimscopeError, match=r"layer 'conv': .* 8-bit codes in \[-127, 127\], "
                                             r"but the stored weights have 4-bit codes"):
        check_planned_changes(model, four_bit)


def test_cli_report_for_an_onnx_model_without_an_output_file(onnx_model, tmp_path: Path,
                                                             capsys) -> None:
    model, npz = onnx_model
    plan_path = tmp_path / "plan.json"
    Plan.from_dict(HALF_INT8).save(plan_path)
    report_path = tmp_path / "report.json"
    code = main(["compress", str(model.path), "--plan", str(plan_path), "--data", str(npz),
                 "--report", str(report_path)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert [layer["sparsity"] for layer in report["layers"]] == [0.5, 0.5, 0.5]
    assert report["metrics_before"]["accuracy"] == 1.0
    assert "accuracy: 1.0000 ->" in capsys.readouterr().err


def test_cli_needs_an_output_or_a_report(onnx_model, tmp_path: Path, capsys) -> None:
    model, _ = onnx_model
    plan_path = tmp_path / "plan.json"
    Plan.from_dict(HALF_INT8).save(plan_path)
    assert main(["compress", str(model.path), "--plan", str(plan_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("slimscope: error: compress needs an output file (-o) or a report "
                   "(--report), or both")
