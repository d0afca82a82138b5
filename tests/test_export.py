"""Exports in every format, reloaded here with onnxruntime / torch / Slimscope, checked against
the in-memory compressed model; plus sizes, the .onnx flavour choice, and safe writing.

Two real models: the bundled demo CNN (a known architecture) and a small transformer-style
model built here (Linear + LayerNorm + attention; an architecture Slimscope does not know).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file
from torch import nn

import factories
from factories import TinyTransformer
from engine.bundle import MANIFEST, pack_bits, unpack_bits
from engine.cli import main
from engine.compress import compress
from engine.data import ArraySource, DigitsData
from engine.demo import DEMO_MODEL
from engine.errors import SlimscopeError
from engine.export import export, resolve_format, write_output
from engine.export.onnx_common import compact
from engine.formats import LoadOptions, load_model
from engine.formats._torch_common import module_model
from engine.jobs import CancelToken, Cancelled
from engine.model import TensorSpec
from engine.plan import Plan

SEQUENCE, FEATURES = 8, 32


class SignBranch(nn.Module):
    """Data-dependent control flow, which a trace cannot capture: the trace is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


INT4_GROUP = {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32}
PLANS = {
    # Architecture unchanged: half sparse, int8 weights and activations.
    ("demo", "same"): {
        "defaults": {"pruning": {"method": "magnitude-global", "amount": 0.5},
                     "quantization": {"bits": 8, "granularity": "per-channel"}},
        "activation_quant": {"calibration": "minmax"},
    },
    # Channels removed from a conv, the big Linear factorized and its factors in 4 bits.
    ("demo", "changed"): {
        "layers": {"features.3": {"pruning": {"method": "structured", "amount": 0.5}},
                   "classifier.1": {"low_rank": {"rank": 32}, "quantization": INT4_GROUP}},
    },
    ("transformer", "same"): {
        "defaults": {"pruning": {"method": "magnitude", "amount": 0.5},
                     "quantization": INT4_GROUP},
    },
    ("transformer", "changed"): {
        "layers": {"mlp.0": {"pruning": {"method": "structured", "amount": 0.5}},
                   "query": {"low_rank": {"rank": 16}},
                   "mlp.2": {"quantization": {"bits": 3, "granularity": "per-channel"}}},
    },
}
EVERY_FORMAT = ("onnx", "onnx-int8", "onnx-dynamic", "onnx-w4", "onnx-w8", "state-dict",
                "torch-module", "torchscript", "safetensors", "pt2", "slim")
#: Formats that hold a changed architecture; the others are covered by the "same" plans.
STRUCTURE_FORMATS = ("onnx", "onnx-w4", "torch-module", "torchscript", "pt2", "slim")
WEIGHTS_ONLY = ("state-dict", "safetensors")
SUFFIX = {"state-dict": ".pt", "torch-module": ".pt", "torchscript": ".pt", "safetensors":
          ".safetensors", "pt2": ".pt2", "slim": ".slim"}
CASES = [(model, plan, fmt) for (model, plan) in PLANS
         for fmt in (EVERY_FORMAT if plan == "same" else STRUCTURE_FORMATS)]


def structured_inputs(count: int, seed: int) -> np.ndarray:
    """Token features with a per-sample offset, so the logits differ between samples."""
    rng = np.random.default_rng(seed)
    offsets = rng.standard_normal((count, 1, FEATURES)) * 2
    return (offsets + rng.standard_normal((count, SEQUENCE, FEATURES))).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two shared cores: torch's spinning worker threads make these tiny models 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """name -> (Model, evaluation data, calibration data)."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    torch.save(TinyTransformer(FEATURES).eval(), folder / "transformer.pt")
    transformer = load_model(folder / "transformer.pt",
                             LoadOptions(trust=True, input_shape=(1, SEQUENCE, FEATURES)))
    tokens = ArraySource(structured_inputs(64, 1), None, "token features")
    return {
        "demo": (load_model(DEMO_MODEL), DigitsData("test"), DigitsData("calibration")),
        "transformer": (transformer, tokens, ArraySource(structured_inputs(64, 2), None, "cal")),
    }


@pytest.fixture(scope="module")
def compressed(models) -> dict:
    out = {}
    for (name, plan), raw in PLANS.items():
        model, _, calibration = models[name]
        out[name, plan] = compress(model, Plan.from_dict(raw), calibration=calibration,
                                   measure=False)[0]
    return out


def run_file(fmt: str, path: Path, original: nn.Module, batch: np.ndarray) -> np.ndarray:
    """The written file's outputs, loaded the way its users load it (not through our exporter)."""
    if fmt.startswith("onnx"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: batch})[0]
    inputs = torch.from_numpy(batch)
    if fmt in WEIGHTS_ONLY:
        state = (load_file(str(path)) if fmt == "safetensors"
                 else torch.load(path, weights_only=True))
        module = copy.deepcopy(original)
        module.load_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    elif fmt == "torch-module":
        module = torch.load(path, weights_only=False)
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path))
    elif fmt == "pt2":
        module = torch.export.load(str(path)).module()  # eval mode is baked in; no .eval()
        with torch.no_grad():
            return module(inputs).numpy()
    else:
        module = load_model(path).module  # by content: the .slim adapter
    with torch.no_grad():
        return module.eval()(inputs).numpy()


@pytest.mark.parametrize("name,plan,fmt", CASES, ids=["-".join(case) for case in CASES])
def test_every_format_reloads_and_matches_the_compressed_model(
        name, plan, fmt, models, compressed, tmp_path) -> None:
    model, data, calibration = models[name]
    result = export(compressed[name, plan], model, tmp_path / f"out{SUFFIX.get(fmt, '.onnx')}",
                    format=fmt, data=data, calibration=calibration, measure=False)
    assert result.verification.passed, result.verification.summary()
    assert result.kept and Path(result.path).stat().st_size == result.bytes
    batch = data.inputs[:16]
    with torch.no_grad():
        expected = compressed[name, plan].module.eval()(torch.from_numpy(batch)).numpy()
    got = run_file(fmt, Path(result.path), model.module, batch)
    if fmt.startswith("onnx"):
        onnx.checker.check_model(result.path, full_check=True)
    if fmt in ("onnx", "slim") or not fmt.startswith("onnx"):  # the same weights, exactly
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    else:  # activations or weights rounded again by onnxruntime
        cosine = (got * expected).sum() / (np.linalg.norm(got) * np.linalg.norm(expected))
        assert cosine > 0.99
        assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_onnx_flavour_follows_the_plan(models, compressed) -> None:
    demo = models["demo"][0]
    chosen = {key: resolve_format(Path("x.onnx"), None, compressed[key], models[key[0]][0])[0].name
              for key in compressed}
    assert chosen == {("demo", "same"): "onnx-int8", ("demo", "changed"): "onnx-w4",
                      ("transformer", "same"): "onnx-w4", ("transformer", "changed"): "onnx-w4"}
    pruned_only = compress(demo, Plan.from_dict({"defaults": {"pruning": {"amount": 0.3}}}),
                           measure=False)[0]
    assert resolve_format(Path("x.onnx"), None, pruned_only, demo)[0].name == "onnx"
    assert resolve_format(Path("x.pt"), None, pruned_only, demo)[0].name == "state-dict"
    assert resolve_format(Path("x.pt"), None, compressed["demo", "changed"], demo)[0].name \
        == "torchscript"


def _onnx_parts(path: Path) -> tuple[set[str], dict[str, onnx.TensorProto]]:
    graph = onnx.load(str(path)).graph
    return {node.op_type for node in graph.node}, {t.name: t for t in graph.initializer}


def test_int8_onnx_is_a_quarter_of_fp32_and_faster(models, compressed, tmp_path) -> None:
    model, data, calibration = models["demo"]
    result = export(compressed["demo", "same"], model, tmp_path / "int8.onnx", data=data,
                    calibration=calibration)
    assert result.format == "onnx-int8" and result.verification.passed
    assert result.size_ratio <= 0.26  # vs the original as fp32 ONNX, written the same way
    ops, weights = _onnx_parts(tmp_path / "int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in weights.values() if t.data_type == TensorProto.INT8]
    assert sum(math.prod(t.dims) for t in int8_weights) >= 0.99 * sum(
        p.numel() for n, p in model.module.named_parameters() if n.endswith("weight")
        and p.dim() > 1)
    assert result.latency_ms < result.baseline_latency_ms  # measured 0.4x here
    assert result.verification.metrics["accuracy"] >= result.baseline_metrics["accuracy"] - 0.01


def test_weight_only_4bit_uses_matmulnbits_with_the_plans_codes(models, compressed,
                                                                tmp_path) -> None:
    model, data, _ = models["transformer"]
    result = export(compressed["transformer", "same"], model, tmp_path / "w4.onnx", data=data,
                    measure=False)
    assert result.format == "onnx-w4"
    ops, _ = _onnx_parts(tmp_path / "w4.onnx")
    assert "MatMulNBits" in ops and "Gemm" not in ops
    assert result.size_ratio < 0.2  # 4-bit codes + a scale and zero point per 32 weights
    # Same block size and symmetry as the plan: onnxruntime lands on the plan's own grid.
    assert result.verification.metrics["max_abs_diff"] < 1e-4


def test_weight_only_says_why_a_conv_only_model_cannot(tmp_path) -> None:
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    model = module_model(tmp_path / "convs.pt", "torch-module", convs, input_shape=(1, 3, 8, 8))
    quantized = compress(model, Plan.from_dict(
        {"defaults": {"quantization": INT4_GROUP | {"group_size": 9}}}), measure=False)[0]
    with pytest.raises(SlimscopeError, match="no 4-bit kernel for Conv"):
        export(quantized, model, tmp_path / "w4.onnx", format="onnx-w4", measure=False)
    assert not (tmp_path / "w4.onnx").exists()


def test_structured_pruning_and_low_rank_really_shrink_the_onnx_graph(models, compressed,
                                                                      tmp_path) -> None:
    model, data, _ = models["demo"]
    export(compressed["demo", "changed"], model, tmp_path / "fp32.onnx", format="onnx",
           data=data, measure=False)
    _, weights = _onnx_parts(tmp_path / "fp32.onnx")
    shapes = sorted(tuple(t.dims) for t in weights.values() if len(t.dims) > 1)
    assert (32, 32, 3, 3) in shapes and (64, 32, 3, 3) in shapes  # features.3: 64 -> 32 outputs
    assert not any(64 in s[:2] and s[2:] == (3, 3) and s[1] == 64 for s in shapes)
    matrices = {tuple(sorted(s)) for s in shapes if len(s) == 2}  # MatMul stores (in, out)
    assert {(32, 1024), (32, 128)} <= matrices and (128, 1024) not in matrices  # rank 32


def test_bundle_stores_sparse_and_low_bit_weights_packed(models, compressed, tmp_path) -> None:
    model, data, _ = models["demo"]
    half_int8 = export(compressed["demo", "same"], model, tmp_path / "d.slim", data=data,
                       measure=False)
    assert half_int8.size_ratio <= 0.16  # 1-bit mask + 8-bit non-zeros + scales, zipped
    tmodel, tdata, _ = models["transformer"]
    export(compressed["transformer", "changed"], tmodel, tmp_path / "t.slim", data=tdata,
           measure=False)
    with zipfile.ZipFile(tmp_path / "t.slim") as archive:
        manifest = json.loads(archive.read(MANIFEST))
        entries = {e["name"]: e for e in manifest["tensors"]}
        three_bit = entries["mlp.2.weight"]
        assert three_bit["encoding"] == "quantized" and three_bit["bits"] == 3
        codes = archive.getinfo(three_bit["codes"]).file_size
    assert codes == math.ceil(math.prod(three_bit["shape"]) * 3 / 8)  # 3 bits, not 8
    assert manifest["architecture"] == {"kind": "torchscript"}
    assert entries["mlp.0.weight"]["shape"] == [128, 64]  # structured: 256 -> 128


def test_bundle_opens_by_content_and_inspects(models, compressed, tmp_path, capsys) -> None:
    model, data, _ = models["demo"]
    path = tmp_path / "bundle.slim"
    export(compressed["demo", "changed"], model, path, data=data, measure=False)
    reopened = load_model(path)
    assert reopened.format == "slimscope-bundle" and reopened.module is not None
    assert type(reopened.module).__name__ == "DigitsCNN"  # rebuilt from the zoo, not a graph
    assert reopened.module.features[3].out_channels == 32
    assert main(["inspect", str(path)]) == 0
    assert "slimscope-bundle" in capsys.readouterr().out


def test_bundle_keeps_tied_weights_tied_and_codes_exact(tmp_path) -> None:
    lm = factories.tied_lm()
    model = module_model(tmp_path / "lm.pt", "torch-module", lm,
                         inputs=[TensorSpec("ids", (1, 5), "int64")])
    plan = {"layers": {"head": {"quantization": {"bits": 2, "granularity": "per-channel"}}}}
    quantized = compress(model, Plan.from_dict(plan), measure=False)[0]
    ids = np.random.default_rng(0).integers(0, factories.TIED_LM_VOCAB, (16, 5))
    result = export(quantized, model, tmp_path / "lm.slim", data=ArraySource(ids, None, "ids"),
                    measure=False)
    assert result.verification.passed and result.verification.metrics["max_abs_diff"] == 0
    with zipfile.ZipFile(tmp_path / "lm.slim") as archive:
        entries = {e["name"]: e for e in json.loads(archive.read(MANIFEST))["tensors"]}
    assert entries["embed.weight"] == {"name": "embed.weight", "encoding": "alias",
                                       "of": "head.weight"}
    restored = load_model(tmp_path / "lm.slim").module
    assert restored.embed.weight.data_ptr() == restored.head.weight.data_ptr()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trips_and_takes_bits_per_value(bits) -> None:
    values = np.random.default_rng(bits).integers(0, 2 ** bits, 1001).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert len(packed) == math.ceil(1001 * bits / 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), values)


def test_constant_node_weights_become_initializers() -> None:
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="a_long_node_name")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compacted = compact(model)
    assert [n.op_type for n in compacted.graph.node] == ["MatMul"]
    assert [t.name for t in compacted.graph.initializer] == ["w"]
    x = np.ones((2, 4), np.float32)
    session = ort.InferenceSession(compacted.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight, rtol=1e-6)


def _branchy(tmp_path: Path):
    torch.manual_seed(0)
    model = module_model(tmp_path / "branchy.pt", "torch-module", SignBranch().eval(),
                         input_shape=(1, 8))
    positive = np.abs(np.random.default_rng(0).standard_normal((64, 8))).astype(np.float32)
    data = ArraySource(np.concatenate([positive, -positive]), None, "both signs")
    plan = Plan.from_dict({"defaults": {"pruning": {"amount": 0.25}}})
    return model, compress(model, plan, measure=False)[0], data


def test_failed_verification_discards_the_file_and_keeps_the_previous_one(tmp_path) -> None:
    model, compressed_model, data = _branchy(tmp_path)
    destination = tmp_path / "out.pt"
    destination.write_bytes(b"previous export")
    result = export(compressed_model, model, destination, format="torchscript", data=data,
                    measure=False)
    assert not result.verification.passed and not result.kept
    assert "max |diff|" in result.verification.summary()
    assert destination.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]
    kept = export(compressed_model, model, destination, format="torchscript", data=data,
                  measure=False, keep_unverified=True)
    assert kept.kept and not kept.verification.passed
    assert destination.read_bytes()[:2] == b"PK"


def test_cancelled_export_leaves_no_partial_file(models, compressed, tmp_path) -> None:
    model, data, calibration = models["demo"]
    destination = tmp_path / "out.onnx"
    destination.write_bytes(b"previous export")
    token = CancelToken()

    def cancel_when_verifying(fraction: float, message: str = "") -> None:
        if message.startswith("verifying"):
            token.cancel()

    with pytest.raises(Cancelled):
        export(compressed["demo", "same"], model, destination, data=data,
               calibration=calibration, progress=cancel_when_verifying, cancel=token)
    assert destination.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_refusals_come_before_anything_is_written(models, compressed, tmp_path) -> None:
    model, data, _ = models["demo"]
    changed = compressed["demo", "changed"]
    with pytest.raises(SlimscopeError, match="refusing to overwrite the input model"):
        export(changed, model, DEMO_MODEL, data=data)
    with pytest.raises(SlimscopeError, match="changes the architecture"):
        export(changed, model, tmp_path / "w.safetensors", data=data)
    with pytest.raises(SlimscopeError, match="writes .onnx files, not .pt"):
        export(changed, model, tmp_path / "w.pt", format="onnx-int8", data=data)
    with pytest.raises(SlimscopeError, match="unknown output format .bin"):
        export(changed, model, tmp_path / "w.bin", data=data)
    assert list(tmp_path.iterdir()) == []


def test_write_output_writes_a_verified_reloadable_file(models, compressed, tmp_path) -> None:
    written = write_output(compressed["demo", "same"], models["demo"][0], tmp_path / "demo.pt")
    assert load_model(written).module is not None  # the state_dict names its architecture


def test_cli_writes_a_verified_bundle_and_a_report(tmp_path, capsys) -> None:
    plan = tmp_path / "plan.json"
    Plan.from_dict(PLANS["demo", "same"]).save(plan)
    output, report = tmp_path / "demo.slim", tmp_path / "report.json"
    assert main(["compress", "demo", "--plan", str(plan), "-o", str(output),
                 "--report", str(report)]) == 0
    exported = json.loads(report.read_text())["export"]
    assert exported["format"] == "slim" and exported["verification"]["passed"]
    assert exported["bytes"] == output.stat().st_size and exported["size_ratio"] <= 0.16
    assert exported["latency_ms"] > 0 and exported["baseline_metrics"]["accuracy"] > 0.97
    assert "verification passed" in capsys.readouterr().err


def test_cli_exits_1_and_writes_nothing_when_verification_fails(tmp_path, capsys) -> None:
    model, _, data = _branchy(tmp_path)
    torch.save(model.module, tmp_path / "branchy.pt")
    np.save(tmp_path / "data.npy", data.inputs)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"defaults": {"pruning": {"amount": 0.25}}}))
    code = main(["compress", str(tmp_path / "branchy.pt"), "--trust", "--plan", str(plan),
                 "-o", str(tmp_path / "out.pt"), "--format", "torchscript", "--data",
                 str(tmp_path / "data.npy"), "--no-measure"])
    assert code == 1
    assert "verification FAILED" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_cli_rejects_a_format_the_extension_cannot_hold_before_compressing(tmp_path,
                                                                          capsys) -> None:
    plan = tmp_path / "plan.json"
    Plan.from_dict(PLANS["demo", "same"]).save(plan)
    code = main(["compress", "demo", "--plan", str(plan), "-o", str(tmp_path / "x.pt"),
                 "--format", "onnx-w4"])
    assert code == 2
    assert "format onnx-w4 writes .onnx files" in capsys.readouterr().err
