"""Format adapters: a table of good files with what they must load as, and a table of bad
files with the one-line error each must give. Every file is written fresh by tests/factories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import factories
from engine import zoo
from engine.errors import ModelLoadError, UntrustedPickleError
from engine.formats import LoadOptions, load_model
from engine.formats._torch_common import guess_kind
from engine.formats.onnx_format import EXTERNAL_DATA_DIR_KEY, proto_with_weights
from engine.model import PRUNABLE_KINDS, Model

CNN_KINDS = {"conv": "Conv2d", "bn": "BatchNorm2d", "fc": "Linear"}
CNN_ONNX_KINDS = {"conv": "Conv", "bn": "BatchNormalization", "fc": "Gemm"}
TIED_KINDS = {"embed": "Embedding", "norm": "LayerNorm", "head": "Linear"}
#: Hand-built TinyCNN ONNX: no num_batches_tracked (-1), plus a 2-element Reshape shape (+2).
CNN_ONNX_PARAMS = factories.TINY_CNN_PARAMS + 1


def _digits_cnn_params() -> int:
    return sum(t.numel() for t in zoo.build("digits_cnn").state_dict().values())


@dataclass(frozen=True)
class Good:
    id: str
    write: Callable[[Path], Path]
    format: str
    kinds: dict[str, str]  # layer name -> kind, in layer order
    params: int
    runnable: bool
    macs: dict[str, int] | None = None  # None: MACs must be unknown
    shared: dict[str, str] = field(default_factory=dict)  # layer -> layer whose weight it reuses
    non_finite: dict[str, int] = field(default_factory=dict)
    #: The module whose state_dict the loaded weights must equal, key for key.
    reference: Callable[[], torch.nn.Module] | None = None
    options: LoadOptions = LoadOptions()


GOOD = [
    Good("state-dict", factories.write_state_dict, "torch-state-dict", CNN_KINDS,
         factories.TINY_CNN_PARAMS, False, reference=factories.tiny_cnn),
    Good("legacy-state-dict", factories.write_legacy_state_dict, "torch-state-dict", CNN_KINDS,
         factories.TINY_CNN_PARAMS, False, reference=factories.tiny_cnn),
    Good("checkpoint-nested-under-model", factories.write_checkpoint, "torch-state-dict",
         CNN_KINDS, factories.TINY_CNN_PARAMS, False),
    Good("checkpoint-nested-under-other-key",
         lambda d: factories.write_checkpoint(d, model_key="generator"), "torch-state-dict",
         {f"generator.{name}": kind for name, kind in CNN_KINDS.items()},
         factories.TINY_CNN_PARAMS, False),
    Good("tied-state-dict", factories.write_tied_state_dict, "torch-state-dict", TIED_KINDS,
         factories.TIED_LM_PARAMS, False, shared={"head": "embed"}, reference=factories.tied_lm),
    Good("pickled-module-trusted", factories.write_pickled_module, "torch-module", CNN_KINDS,
         factories.TINY_CNN_PARAMS, True, factories.TINY_CNN_MACS, reference=factories.tiny_cnn,
         options=LoadOptions(trust=True, input_shape=factories.TINY_CNN_INPUT)),
    Good("torchscript", factories.write_torchscript, "torchscript", CNN_KINDS,
         factories.TINY_CNN_PARAMS, True, reference=factories.tiny_cnn),
    Good("torchscript-with-input-shape", factories.write_torchscript, "torchscript", CNN_KINDS,
         factories.TINY_CNN_PARAMS, True, factories.TINY_CNN_MACS,
         options=LoadOptions(input_shape=factories.TINY_CNN_INPUT)),
    Good("torch-export", factories.write_torch_export, "torch-export", CNN_KINDS,
         factories.TINY_CNN_PARAMS, True, factories.TINY_CNN_MACS, reference=factories.tiny_cnn),
    Good("tied-torch-export", factories.write_tied_torch_export, "torch-export", TIED_KINDS,
         factories.TIED_LM_PARAMS, True, factories.TIED_LM_MACS, shared={"head": "embed"}),
    Good("onnx-dynamic-batch-counts-one-sample", factories.write_onnx, "onnx", CNN_ONNX_KINDS,
         CNN_ONNX_PARAMS, True, factories.TINY_CNN_MACS, reference=factories.tiny_cnn),
    Good("onnx-with-input-shape", factories.write_onnx, "onnx", CNN_ONNX_KINDS, CNN_ONNX_PARAMS,
         True, {name: 2 * macs for name, macs in factories.TINY_CNN_MACS.items()},
         options=LoadOptions(input_shape=(2, 1, 8, 8))),
    Good("onnx-external-data", factories.write_onnx_external_data, "onnx", CNN_ONNX_KINDS,
         CNN_ONNX_PARAMS, True, factories.TINY_CNN_MACS, reference=factories.tiny_cnn),
    Good("onnx-constant-node-weights", factories.write_onnx_constant_weights, "onnx",
         {"proj": "MatMul"}, 8 * 4 + 4, True, {"proj": 2 * 4 * 8}),
    Good("onnx-initializer-used-twice", factories.write_onnx_shared_weight, "onnx",
         {"embed": "Embedding", "proj": "MatMul"}, 16 * 8 + 8 * 8, True,
         {"embed": 0, "proj": 2 * 5 * 8 * 8}),
    Good("onnx-named-dot-pt", lambda d: factories.write_onnx(d, "really_onnx.pt"), "onnx",
         CNN_ONNX_KINDS, CNN_ONNX_PARAMS, True, factories.TINY_CNN_MACS),
    Good("safetensors", factories.write_safetensors, "safetensors",
         {"bn": "BatchNorm2d", "conv": "Conv2d", "fc": "Linear"}, factories.TINY_CNN_PARAMS,
         False, reference=factories.tiny_cnn),
    Good("safetensors-known-arch", factories.write_safetensors_known_arch, "safetensors",
         {"features.0": "Conv2d", "features.1": "BatchNorm2d", "features.3": "Conv2d",
          "features.4": "BatchNorm2d", "features.7": "Conv2d", "features.8": "BatchNorm2d",
          "classifier.1": "Linear", "classifier.4": "Linear"},
         _digits_cnn_params(), True,
         {"features.0": 64 * 32 * 9, "features.1": 64 * 32, "features.3": 64 * 64 * 32 * 9,
          "features.4": 64 * 64, "features.7": 16 * 64 * 64 * 9, "features.8": 16 * 64,
          "classifier.1": 128 * 1024, "classifier.4": 10 * 128}),
    Good("safetensors-bfloat16", factories.write_safetensors_bf16, "safetensors",
         {"bn": "BatchNorm2d", "conv": "Conv2d", "fc": "Linear"}, factories.TINY_CNN_PARAMS,
         False),
    Good("nan-weights", factories.write_nan_weights, "safetensors",
         {"bn": "BatchNorm2d", "conv": "Conv2d", "fc": "Linear"}, factories.TINY_CNN_PARAMS,
         False, non_finite={"fc": 3}),
]


@pytest.mark.parametrize("case", GOOD, ids=lambda case: case.id)
def test_good_files_load_as_expected(case: Good, tmp_path: Path) -> None:
    model = load_model(case.write(tmp_path), case.options)

    assert model.format == case.format
    assert {layer.name: layer.kind for layer in model.layers} == case.kinds
    assert model.layer_names() == list(case.kinds)
    assert model.params == case.params
    assert model.runnable == case.runnable
    assert (model.module is not None) == (case.runnable and case.format != "onnx")
    assert {layer.name: layer.shared_with for layer in model.layers if layer.shared_with} \
        == case.shared
    macs = {layer.name: layer.macs for layer in model.layers}
    assert macs == (case.macs or dict.fromkeys(case.kinds))
    assert model.non_finite() == case.non_finite
    for layer in model.layers:
        assert layer.prunable == (layer.kind in PRUNABLE_KINDS)
        assert layer.quantizable == layer.prunable
    if not case.runnable:
        assert any("no graph" in note for note in model.notes)
    if case.reference is not None:
        _assert_weights_equal(model, case.reference())


def _assert_weights_equal(model: Model, reference: torch.nn.Module) -> None:
    state = reference.state_dict()
    for layer in model.layers:
        expected = state[layer.weight_key].detach().numpy()
        np.testing.assert_array_equal(model.weight(layer), expected)
        if layer.bias_key:
            np.testing.assert_array_equal(model.tensors.get(layer.bias_key),
                                          state[layer.bias_key].detach().numpy())


def test_tied_weights_are_counted_once_in_bytes(tmp_path: Path) -> None:
    model = load_model(factories.write_tied_state_dict(tmp_path))
    embed, head = model.layer("embed"), model.layer("head")
    assert embed.params == head.params == 16 * 8
    assert model.nbytes == factories.TIED_LM_PARAMS * 4
    assert sum(layer.params for layer in model.layers) > model.params


def test_module_weights_are_zero_copy_views(tmp_path: Path) -> None:
    model = load_model(factories.write_torchscript(tmp_path))
    live = model.module.conv.weight.detach().numpy()
    assert np.shares_memory(model.weight("conv"), live)


def test_bfloat16_reports_its_dtype_and_reads_as_float32(tmp_path: Path) -> None:
    model = load_model(factories.write_safetensors_bf16(tmp_path))
    conv = model.layer("conv")
    assert conv.dtype == "bfloat16"
    assert conv.nbytes == (36 + 4) * 2
    weight = model.weight(conv)
    assert weight.dtype == np.float32
    reference = factories.tiny_cnn().conv.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(weight, reference)


def test_inputs_and_outputs_come_from_the_file(tmp_path: Path) -> None:
    onnx_model = load_model(factories.write_onnx(tmp_path))
    assert [(s.name, s.shape) for s in onnx_model.inputs] == [("input", ("N", 1, 8, 8))]
    assert [(s.name, s.shape) for s in onnx_model.outputs] == [("logits", ("N", 10))]
    exported = load_model(factories.write_tied_torch_export(tmp_path))
    assert [(s.shape, s.dtype) for s in exported.inputs] == [(factories.TIED_LM_INPUT, "int64")]
    assert [s.shape for s in exported.outputs] == [(1, 5, factories.TIED_LM_VOCAB)]
    weights_only = load_model(factories.write_safetensors(tmp_path))
    assert [s.shape for s in weights_only.inputs] == [factories.TINY_CNN_INPUT]


def test_runnable_modules_reproduce_the_original(tmp_path: Path) -> None:
    x = torch.randn(factories.TINY_CNN_INPUT, generator=torch.Generator().manual_seed(1))
    expected = factories.tiny_cnn()(x)
    for write, options in [(factories.write_torchscript, LoadOptions()),
                           (factories.write_torch_export, LoadOptions()),
                           (factories.write_pickled_module, LoadOptions(trust=True))]:
        model = load_model(write(tmp_path), options)
        with torch.no_grad():
            torch.testing.assert_close(model.module(x), expected)


def test_onnx_external_data_stays_external_until_asked(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = load_model(factories.write_onnx_external_data(tmp_path))
    assert model.metadata[EXTERNAL_DATA_DIR_KEY] == str(tmp_path)
    assert isinstance(model.weight("conv"), np.memmap)
    assert all(t.data_location == 1 for t in model.onnx_model.graph.initializer)  # EXTERNAL
    complete = proto_with_weights(model)
    session = ort.InferenceSession(complete.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal(factories.TINY_CNN_INPUT).astype(np.float32)
    (logits,) = session.run(None, {"input": x})
    expected = factories.tiny_cnn()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_onnx_from_the_torch_exporter(tmp_path: Path) -> None:
    model = load_model(factories.write_onnx_exported(tmp_path))
    # The exporter folds batch norm into the convolution and names that weight itself.
    assert [layer.kind for layer in model.layers] == ["Conv", "Gemm"]
    assert model.layers[1].name == "fc"
    assert [layer.macs for layer in model.layers] == [factories.TINY_CNN_MACS["conv"],
                                                      factories.TINY_CNN_MACS["fc"]]


def test_trusted_module_without_input_shape_has_no_macs(tmp_path: Path) -> None:
    model = load_model(factories.write_pickled_module(tmp_path), LoadOptions(trust=True))
    assert model.format == "torch-module" and model.macs is None and not model.inputs


@pytest.mark.parametrize(("name", "shape", "running_stats", "previous", "kind"), [
    ("features.0", (8, 3, 3, 3), False, None, "Conv2d"),
    ("conv1d", (8, 3, 5), False, None, "Conv1d"),
    ("conv3d", (8, 3, 3, 3, 3), False, None, "Conv3d"),
    ("fc", (10, 64), False, None, "Linear"),
    ("model.embed_tokens", (100, 16), False, None, "Embedding"),
    ("transformer.wte", (100, 16), False, None, "Embedding"),
    ("tok_emb", (100, 16), False, None, "Embedding"),
    ("bn", (8,), True, "Conv2d", "BatchNorm2d"),
    ("bn", (8,), True, "Linear", "BatchNorm1d"),
    ("ln_f", (16,), False, "Linear", "LayerNorm"),
    ("scalar", (), False, None, None),
])
def test_kinds_are_guessed_from_names_and_shapes(
    name: str, shape: tuple[int, ...], running_stats: bool, previous: str | None, kind: str | None
) -> None:
    assert guess_kind(name, shape, has_running_stats=running_stats, previous_kind=previous) == kind


# -- bad inputs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    id: str
    write: Callable[[Path, Path], Path]  # (folder, marker file that must never appear) -> path
    fragment: str
    error: type[ModelLoadError] = ModelLoadError
    options: LoadOptions = LoadOptions()


BAD = [
    Bad("truncated-zip-state-dict",
        lambda d, m: factories.truncate(factories.write_state_dict(d)), "damaged or truncated"),
    Bad("truncated-torchscript",
        lambda d, m: factories.truncate(factories.write_torchscript(d)), "damaged or truncated"),
    Bad("truncated-legacy-pickle",
        lambda d, m: factories.truncate(factories.write_legacy_state_dict(d)), "torch-pickle"),
    Bad("truncated-onnx",
        lambda d, m: factories.truncate(factories.write_onnx(d)), "not a valid ONNX file"),
    Bad("truncated-safetensors",
        lambda d, m: factories.truncate(factories.write_safetensors(d)),
        "not a valid safetensors file"),
    Bad("random-bytes", lambda d, m: factories.write_random_bytes(d), "not a model format"),
    Bad("png-named-onnx", lambda d, m: factories.write_png(d, "model.onnx"), "not a model format"),
    Bad("zip-without-model", lambda d, m: factories.write_plain_zip(d), "not a model format"),
    Bad("malicious-torch-save", factories.write_malicious_pickle, "posix.system",
        UntrustedPickleError),
    Bad("malicious-raw-pickle", factories.write_malicious_raw_pickle, "posix.system",
        UntrustedPickleError),
    Bad("malicious-torch-export", factories.write_malicious_torch_export, "posix.system",
        UntrustedPickleError),
    Bad("pickled-module-untrusted", lambda d, m: factories.write_pickled_module(d),
        "torch.nn.modules.conv.Conv2d", UntrustedPickleError),
    Bad("onnx-missing-external-data",
        lambda d, m: factories.write_onnx_missing_external_data(d), "'tiny_cnn.weights'"),
    Bad("state-dict-without-layers", lambda d, m: factories.write_no_weight_layers(d),
        "has no weight layers"),
    Bad("onnx-without-layers", lambda d, m: factories.write_onnx_without_weights(d),
        "has no weight layers"),
    Bad("weights-not-fitting-named-arch",
        lambda d, m: factories.write_safetensors(d, extra_metadata={zoo.ARCH_METADATA_KEY:
                                                                     "digits_cnn"}),
        "do not fit the architecture 'digits_cnn'"),
    Bad("empty-file", lambda d, m: factories.write_empty(d), "the file is empty"),
    Bad("directory", lambda d, m: d, "is a folder"),
    Bad("missing-file", lambda d, m: d / "nowhere.onnx", "no such file"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda case: case.id)
def test_bad_files_fail_with_one_clear_line(case: Bad, tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    path = case.write(folder, marker)

    with pytest.raises(case.error) as raised:
        load_model(path, case.options)

    message = str(raised.value)
    assert case.fragment in message
    assert "\n" not in message and message.strip() == message
    assert not marker.exists(), "loading ran code from the file"


def test_untrusted_message_says_how_to_proceed(tmp_path: Path) -> None:
    with pytest.raises(UntrustedPickleError) as raised:
        load_model(factories.write_pickled_module(tmp_path))
    message = str(raised.value)
    assert message.startswith("tiny_cnn_module.pt is a pickled object that can run code")
    assert "--trust" in message
    assert "torch._utils" not in message  # tensor-rebuilding helpers are not worth naming


def test_exported_onnx_layers_are_named_after_their_modules(tmp_path: Path) -> None:
    """BatchNorm folding gives conv weights generated names; the table shows module names."""
    from factories import tiny_cnn

    model = load_model(factories.write_onnx_exported(tmp_path))
    torch_names = {name for name, module in tiny_cnn().named_modules()
                   if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))}
    assert torch_names <= set(model.layer_names())
    assert not any(name.startswith("onnx::") for name in model.layer_names())


def test_quantized_onnx_files_still_show_their_layers(tmp_path: Path) -> None:
    """Slimscope's own int8 exports: weights behind DequantizeLinear, or in MatMulNBits."""
    import onnx

    from engine.methods.static_int8 import quantize_static_int8, quantize_weight_only

    fp32 = factories.tiny_cnn_onnx(dynamic_batch=False)
    calibration = [np.random.default_rng(0).standard_normal(factories.TINY_CNN_INPUT)
                   .astype(np.float32) for _ in range(4)]
    qdq_path = tmp_path / "qdq.onnx"
    onnx.save(quantize_static_int8(fp32, calibration), str(qdq_path))
    qdq = load_model(qdq_path)
    assert [layer.kind for layer in qdq.layers if layer.kind in ("Conv", "Gemm", "MatMul")]
    assert any(layer.dtype == "int8" for layer in qdq.layers)

    class TwoLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.relu(self.up(x)))

    from engine.onnx_tools import export_onnx

    w4_path = tmp_path / "w4.onnx"
    onnx.save(quantize_weight_only(export_onnx(TwoLinear(), torch.zeros(2, 64)), bits=4),
              str(w4_path))
    w4 = load_model(w4_path)
    assert len([layer for layer in w4.layers if layer.kind == "MatMul"]) == 2
