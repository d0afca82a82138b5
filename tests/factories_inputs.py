"""Small stand-ins for real models' inputs: several named inputs, token ids, a state whose batch
axis is 1, a scalar setting, a static batch, TorchScript with an ``int`` argument, PReLU.

Each ``write_*`` function writes one file into the folder a test gives and returns its path;
the models are seeded and tiny. They mirror what the real files in issue 13 ask for: MiniLM's
``input_ids``/``attention_mask``, silero's ``state [2, B, 128]`` and scalar ``sr``, and
torch.export programs made for batch 1.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from tests.factories import _onnx_model

#: The two-input text model: float features [B, 4] plus int64 ids [B, seq]; 5 outputs.
TEXT_VOCAB = 120
TEXT_FEATURES = 4
TEXT_CLASSES = 5
#: The stateful model: x [B, 4], state [2, B, 4], sr int64 scalar; 3 outputs.
STATE_WIDTH = 4
STATE_CLASSES = 3


def write_text_onnx(folder: Path, name: str = "text.onnx") -> Path:
    """``logits = (features + mean(embedding[ids] * mask)) @ W``: a float input and int64 token ids
    (dynamic batch and sequence), an int64 attention mask, as a text model takes them."""
    rng = np.random.default_rng(0)
    weights = {
        "embedding": rng.standard_normal((TEXT_VOCAB, TEXT_FEATURES)).astype(np.float32),
        "head": rng.standard_normal((TEXT_FEATURES, TEXT_CLASSES)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "minus_one"], ["mask_3d"]),
        helper.make_node("Mul", ["embedded", "mask_3d"], ["masked"]),
        helper.make_node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Add", ["features", "pooled"], ["mixed"]),
        helper.make_node("MatMul", ["mixed", "head"], ["logits"]),
    ]
    weights["minus_one"] = np.array([-1], np.int64)
    inputs = [
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", TEXT_FEATURES]),
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", TEXT_CLASSES])]
    path = folder / name
    onnx.save(_onnx_model(nodes, inputs, outputs, weights), str(path))
    return path


def write_stateful_onnx(folder: Path, static_batch: int | None = None,
                        name: str = "stateful.onnx") -> Path:
    """Silero's input layout in small: ``x [B, 4]``, ``state [2, B, 4]`` (batch on axis 1) and a
    scalar int64 ``sr``; ``out = ((x + state[0] - state[1]) @ W) * sr / 16000``. With
    `static_batch`, every batch size is fixed, as in a model exported for batch 1."""
    rng = np.random.default_rng(1)
    weights = {
        "head": rng.standard_normal((STATE_WIDTH, STATE_CLASSES)).astype(np.float32),
        "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
        "rate": np.array(16000.0, np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["state", "zero"], ["first"], axis=0),
        helper.make_node("Gather", ["state", "one"], ["second"], axis=0),
        helper.make_node("Sub", ["first", "second"], ["delta_3d"]),
        helper.make_node("Squeeze", ["delta_3d", "zero"], ["delta"]),
        helper.make_node("Add", ["x", "delta"], ["mixed"]),
        helper.make_node("MatMul", ["mixed", "head"], ["raw"]),
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_f", "rate"], ["gain"]),
        helper.make_node("Mul", ["raw", "gain"], ["out"]),
    ]
    batch: int | str = static_batch or "batch"
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, STATE_WIDTH]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch, STATE_WIDTH]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, STATE_CLASSES])]
    path = folder / name
    onnx.save(_onnx_model(nodes, inputs, outputs, weights), str(path))
    return path


def stateful_reference(x: np.ndarray, state: np.ndarray, sr: int, head: np.ndarray
                       ) -> np.ndarray:
    """What :func:`write_stateful_onnx` computes, in numpy."""
    return ((x + state[0] - state[1]) @ head) * (sr / 16000.0)


def write_stateful_npz(folder: Path, count: int = 10, name: str = "chunks.npz",
                       sr: int = 8000) -> Path:
    """One array per input name, as silero_chunks.npz: x [N, 4], state [2, N, 4], sr scalar."""
    rng = np.random.default_rng(2)
    path = folder / name
    np.savez(path, x=rng.standard_normal((count, STATE_WIDTH)).astype(np.float32),
             state=rng.standard_normal((2, count, STATE_WIDTH)).astype(np.float32),
             sr=np.array(sr, np.int64))
    return path


class PReLUNet(nn.Module):
    """facenet's MTCNN pattern: convolutions each followed by a PReLU named ``preluN``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.prelu1 = nn.PReLU(4)
        self.dense = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.prelu1(self.conv1(x)).flatten(1))


def write_prelu_state_dict(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "onet_like.pt"
    torch.save(PReLUNet().state_dict(), path)
    return path


class FixedShapeNet(nn.Module):
    """A net that bakes its batch into a reshape, as real static exports do: at batch 1 its
    graph refuses any other batch (and a copy without the guard would compute garbage)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).reshape(x.shape[0], -1))


def write_static_batch_pt2(folder: Path) -> tuple[Path, nn.Module]:
    """A torch.export program made for batch 1, and the eager module it came from."""
    torch.manual_seed(0)
    module = FixedShapeNet().eval()
    path = folder / "static_b1.pt2"
    program = torch.export.export(module, (torch.zeros(1, 1, 8, 8),))
    torch.export.save(program, str(path))
    return path, module


class RateNet(nn.Module):
    """silero.jit's signature in small: ``forward(x: Tensor, sr: int)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(STATE_WIDTH, STATE_CLASSES)

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        return self.fc(x) * (sr / 16000.0)


def write_rate_torchscript(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "rate_scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(RateNet().eval()), str(path))
    return path
