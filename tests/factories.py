"""Tiny models of every supported format, written into a folder a test gives.

Each ``write_*`` function takes the folder, writes one file (plus any side files it needs) and
returns the model file's path. The models are seeded, small and fast to build, so any test can
make exactly the file it needs:

    path = factories.write_torchscript(tmp_path)
    model = load_model(path)

Two module shapes are used throughout. :class:`TinyCNN` (conv, batch norm, linear; input
``TINY_CNN_INPUT``) and :class:`TiedLM` (embedding, layer norm, and a head tied to the
embedding; input ``TIED_LM_INPUT`` of token ids). Their expected totals are in the constants
below, so tests can check numbers without recomputing them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

from engine import zoo

TINY_CNN_INPUT = (1, 1, 8, 8)
#: conv 36+4, bn 4+4 (+ running_mean 4, running_var 4, num_batches_tracked 1), fc 640+10.
TINY_CNN_PARAMS = 707
#: conv: 4*8*8 outputs x 9; bn: 256 elements; fc: 10 outputs x 64.
TINY_CNN_MACS = {"conv": 2304, "bn": 256, "fc": 640}

TIED_LM_INPUT = (1, 5)
TIED_LM_VOCAB, TIED_LM_WIDTH = 16, 8
#: embed 128 (shared with head), norm 8+8.
TIED_LM_PARAMS = 144
TIED_LM_MACS = {"embed": 0, "norm": 40, "head": 5 * 16 * 8}


class TinyCNN(nn.Module):
    """conv(1->4, 3x3) -> batch norm -> relu -> 2x2 max pool -> linear(64 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


class TiedLM(nn.Module):
    """embedding -> layer norm -> linear head sharing the embedding's weight (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(TIED_LM_VOCAB, TIED_LM_WIDTH)
        self.norm = nn.LayerNorm(TIED_LM_WIDTH)
        self.head = nn.Linear(TIED_LM_WIDTH, TIED_LM_VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


class RunsShellCommand:
    """A pickle payload that would create `marker` through os.system if ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def tiny_cnn() -> TinyCNN:
    """A seeded TinyCNN in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.9, 1.1)
    return model.eval()


def tied_lm() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM().eval()


# -- PyTorch pickles ------------------------------------------------------------------------
def write_state_dict(folder: Path, name: str = "tiny_cnn_state.pt") -> Path:
    """torch.save(state_dict) in the zip format: weights only."""
    path = folder / name
    torch.save(tiny_cnn().state_dict(), path)
    return path


def write_legacy_state_dict(folder: Path) -> Path:
    """The same state dict in the pre-1.6 non-zip format (a bare pickle stream)."""
    path = folder / "tiny_cnn_legacy.pt"
    torch.save(tiny_cnn().state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def write_checkpoint(folder: Path, model_key: str = "model") -> Path:
    """A training checkpoint: weights under `model_key` beside epoch and optimizer state.

    The optimizer holds momentum tensors, which must not be taken for model weights.
    """
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(TINY_CNN_INPUT)).sum().backward()
    optimizer.step()
    path = folder / f"checkpoint_{model_key}.pth"
    torch.save({"epoch": 3, model_key: model.state_dict(), "optimizer": optimizer.state_dict()},
               path)
    return path


def write_tied_state_dict(folder: Path) -> Path:
    """TiedLM's state dict: "embed.weight" and "head.weight" are one storage in the file."""
    path = folder / "tied_lm_state.pt"
    torch.save(tied_lm().state_dict(), path)
    return path


def write_pickled_module(folder: Path) -> Path:
    """torch.save(module): a full pickled nn.Module, which only loads with trust."""
    path = folder / "tiny_cnn_module.pt"
    torch.save(tiny_cnn(), path)
    return path


def write_malicious_pickle(folder: Path, marker: Path) -> Path:
    """A torch.save zip whose unpickling would run `touch marker` via os.system."""
    path = folder / "malicious.pt"
    torch.save({"weight": torch.zeros(2, 2), "payload": RunsShellCommand(marker)}, path)
    return path


def write_malicious_raw_pickle(folder: Path, marker: Path) -> Path:
    """A plain pickle stream (no torch framing) that would run `touch marker`."""
    path = folder / "malicious.pkl"
    path.write_bytes(pickle.dumps(RunsShellCommand(marker), protocol=2))
    return path


def write_no_weight_layers(folder: Path) -> Path:
    """A state dict holding only buffers: tensors, but nothing that is a layer."""
    path = folder / "buffers_only.pt"
    torch.save({"running_mean": torch.zeros(4), "step": torch.tensor(7)}, path)
    return path


# -- TorchScript and torch.export -----------------------------------------------------------
def write_torchscript(folder: Path) -> Path:
    path = folder / "tiny_cnn_scripted.pt"
    with warnings.catch_warnings():  # deprecated for new work, still a format users bring
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(tiny_cnn()), str(path))
    return path


def write_torch_export(folder: Path) -> Path:
    path = folder / "tiny_cnn.pt2"
    program = torch.export.export(tiny_cnn(), (torch.zeros(TINY_CNN_INPUT),))
    torch.export.save(program, str(path))
    return path


def write_malicious_torch_export(folder: Path, marker: Path) -> Path:
    """A real .pt2 doctored so that torch.export.load would run `touch marker`.

    Its weights config marks "fc.bias" as pickled, and that member becomes a torch.save
    payload calling os.system; torch.export.load unpickles such members with weights_only=False.
    """
    source = write_torch_export(folder)
    path = folder / "malicious.pt2"
    payload = io.BytesIO()
    torch.save(RunsShellCommand(marker), payload)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as doctored:
        config_name = next(n for n in original.namelist() if n.endswith("weights_config.json"))
        config = json.loads(original.read(config_name))
        entry = config["config"]["fc.bias"]
        entry["use_pickle"] = True
        target = f"{config_name.rpartition('/')[0]}/{entry['path_name']}"
        for name in original.namelist():
            data = original.read(name)
            if name == config_name:
                data = json.dumps(config).encode()
            elif name == target:
                data = payload.getvalue()
            doctored.writestr(name, data)
    return path


def write_tied_torch_export(folder: Path) -> Path:
    path = folder / "tied_lm.pt2"
    ids = torch.zeros(TIED_LM_INPUT, dtype=torch.long)
    torch.export.save(torch.export.export(tied_lm(), (ids,)), str(path))
    return path


# -- ONNX -----------------------------------------------------------------------------------
def _onnx_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
                outputs: list[onnx.ValueInfoProto],
                initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "slimscope_test", inputs, outputs,
        [numpy_helper.from_array(array, name) for name, array in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="slimscope-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_cnn_onnx(dynamic_batch: bool = True) -> onnx.ModelProto:
    """TinyCNN's float graph written by hand: Conv, BatchNormalization, Relu, MaxPool, Gemm.

    Initializer names follow PyTorch ("conv.weight"), so layers are "conv", "bn", "fc".
    """
    weights = {key: value.detach().numpy() for key, value in tiny_cnn().state_dict().items()
               if not key.endswith("num_batches_tracked")}
    weights["flat_shape"] = np.array([0, -1], dtype=np.int64)
    batch = "N" if dynamic_batch else 1
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean",
                                                "bn.running_var"], ["b"]),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "flat_shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    return _onnx_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        weights,
    )


def write_onnx(folder: Path, name: str = "tiny_cnn.onnx") -> Path:
    """TinyCNN as ONNX with a dynamic batch dimension "N"; weights inside the file."""
    path = folder / name
    onnx.save(tiny_cnn_onnx(), str(path))
    return path


def write_onnx_exported(folder: Path) -> Path:
    """TinyCNN through torch.onnx.export (TorchScript-based exporter): real exporter naming."""
    path = folder / "tiny_cnn_exported.onnx"
    with warnings.catch_warnings():  # the legacy exporter is deprecated, and much faster
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(tiny_cnn(), (torch.zeros(TINY_CNN_INPUT),), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"])
    return path


def write_onnx_external_data(folder: Path) -> Path:
    """TinyCNN as ONNX with every initializer in a side file "tiny_cnn.weights"."""
    path = folder / "tiny_cnn_external.onnx"
    onnx.save(tiny_cnn_onnx(dynamic_batch=False), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="tiny_cnn.weights", size_threshold=0)
    return path


def write_onnx_missing_external_data(folder: Path) -> Path:
    """An ONNX file whose external weight file "tiny_cnn.weights" has been deleted."""
    path = write_onnx_external_data(folder)
    (folder / "tiny_cnn.weights").unlink()
    return path


def write_onnx_constant_weights(folder: Path) -> Path:
    """A MatMul + Add graph whose weights are Constant nodes, not initializers."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["proj.weight"],
                         value=numpy_helper.from_array(weight, "proj.weight")),
        helper.make_node("Constant", [], ["proj.bias"],
                         value=numpy_helper.from_array(bias, "proj.bias")),
        helper.make_node("MatMul", ["x", "proj.weight"], ["h"]),
        helper.make_node("Add", ["h", "proj.bias"], ["y"]),
    ]
    path = folder / "constant_weights.onnx"
    onnx.save(_onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], {}),
              str(path))
    return path


def write_onnx_shared_weight(folder: Path) -> Path:
    """Gather on "embed.weight" (16x8) then two MatMuls reusing one "proj.weight" (8x8).

    The reused initializer is one layer "proj" whose MACs add up both uses: 2 x 5*8*8.
    """
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["embed.weight", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "proj.weight"], ["h"]),
        helper.make_node("MatMul", ["h", "proj.weight"], ["y"]),
    ]
    path = folder / "shared_weight.onnx"
    onnx.save(_onnx_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8])],
        {"embed.weight": rng.standard_normal((16, 8)).astype(np.float32),
         "proj.weight": rng.standard_normal((8, 8)).astype(np.float32)},
    ), str(path))
    return path


def write_onnx_without_weights(folder: Path) -> Path:
    """A valid ONNX graph (Relu) with no weight layers at all."""
    path = folder / "relu_only.onnx"
    onnx.save(_onnx_model([helper.make_node("Relu", ["x"], ["y"])],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], {}),
              str(path))
    return path


# -- safetensors ----------------------------------------------------------------------------
def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().contiguous() for key, value in state.items()}


def write_safetensors(folder: Path, name: str = "tiny_cnn.safetensors",
                      extra_metadata: dict[str, str] | None = None) -> Path:
    """TinyCNN's weights with an input shape in the metadata but no architecture: weights only.

    `extra_metadata` adds header entries, e.g. an architecture these weights do not fit.
    """
    path = folder / name
    metadata = {zoo.INPUT_SHAPE_METADATA_KEY: ",".join(map(str, TINY_CNN_INPUT)),
                **(extra_metadata or {})}
    save_file(_contiguous(tiny_cnn().state_dict()), str(path), metadata=metadata)
    return path


def write_safetensors_known_arch(folder: Path) -> Path:
    """zoo's DigitsCNN weights naming their architecture: loads as a runnable module."""
    torch.manual_seed(0)
    path = folder / "digits_cnn.safetensors"
    save_file(_contiguous(zoo.build("digits_cnn").state_dict()), str(path),
              metadata={zoo.ARCH_METADATA_KEY: "digits_cnn",
                        zoo.INPUT_SHAPE_METADATA_KEY: "1,1,8,8"})
    return path


def write_safetensors_bf16(folder: Path) -> Path:
    """TinyCNN's weights cast to bfloat16, a dtype numpy cannot hold."""
    path = folder / "tiny_cnn_bf16.safetensors"
    state = {key: value.to(torch.bfloat16) if value.is_floating_point() else value
             for key, value in tiny_cnn().state_dict().items()}
    save_file(_contiguous(state), str(path))
    return path


def write_nan_weights(folder: Path, nan_count: int = 3) -> Path:
    """TinyCNN's weights with `nan_count` NaNs in "fc.weight"."""
    state = _contiguous(tiny_cnn().state_dict())
    state["fc.weight"].view(-1)[:nan_count] = float("nan")
    path = folder / "nan_weights.safetensors"
    save_file(state, str(path))
    return path


# -- things that are not models -------------------------------------------------------------
def truncate(path: Path, keep_fraction: float = 0.5) -> Path:
    """Cut a file down to a fraction of its bytes, in place, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def write_random_bytes(folder: Path, name: str = "noise.bin", size: int = 4096) -> Path:
    path = folder / name
    path.write_bytes(b"\x00" + np.random.default_rng(0).bytes(size - 1))
    return path


def write_png(folder: Path, name: str = "picture.onnx") -> Path:
    """A real (1x1 pixel) PNG image, under whatever name the test chooses."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
           + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b""))
    path = folder / name
    path.write_bytes(png)
    return path


def write_empty(folder: Path, name: str = "empty.pt") -> Path:
    path = folder / name
    path.write_bytes(b"")
    return path


def write_plain_zip(folder: Path, name: str = "archive.pt") -> Path:
    """A valid zip that holds no model."""
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    return path


class TinyTransformer(nn.Module):
    """Input projection, one pre-norm block (single-head attention + MLP), mean-pooled head.

    The transformer-style model of the export and int8 tests: Linear + LayerNorm + attention
    through plain matmuls, so ONNX export gives MatMul/Gemm nodes ONNX Runtime quantizes.
    """

    def __init__(self, features: int = 32, width: int = 64, classes: int = 10,
                 activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), activation(),
                                 nn.Linear(4 * width, width))
        self.head = nn.Linear(width, classes)
        self.scale = width ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h = self.norm1(x)
        attention = torch.softmax(self.query(h) @ self.key(h).transpose(1, 2) * self.scale, -1)
        x = x + self.out(attention @ self.value(h))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))  # 2-D input to the head: exported as Gemm
