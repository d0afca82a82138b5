"""PyTorch outputs: a state_dict / safetensors when the architecture is unchanged, else the module.

A state_dict is the safe default (loads with ``weights_only=True``); it is only possible when
every tensor keeps its original name and shape. Structured pruning and low-rank change the
architecture, so those models are saved as a whole pickled module, which the reader must trust.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.compressed import CompressedModel
from engine.errors import SlimscopeError
from engine.model import Model
from engine.safe_write import atomic_path
from engine.zoo import ARCH_METADATA_KEY, INPUT_SHAPE_METADATA_KEY


def architecture_unchanged(compressed: CompressedModel, model: Model) -> bool:
    """True when the compressed state_dict has the original's names and shapes."""
    original = model.require_module("export").state_dict()
    current = compressed.module.state_dict()
    return original.keys() == current.keys() and all(
        original[k].shape == current[k].shape for k in original)


def _state_dict(compressed: CompressedModel) -> dict[str, torch.Tensor]:
    """Tensors as stored: fp16/bf16 casts kept in their dtype, everything contiguous."""
    state = {}
    for name, tensor in compressed.module.state_dict().items():
        dtype = compressed.cast.get(name)
        state[name] = (tensor.to(dtype) if dtype else tensor).detach().contiguous().clone()
    return state


def write_torch(compressed: CompressedModel, model: Model, destination: Path) -> None:
    with atomic_path(destination) as temp:
        if architecture_unchanged(compressed, model):
            torch.save(_state_dict(compressed), temp)
        else:
            torch.save(compressed.module, temp)


def write_safetensors(compressed: CompressedModel, model: Model, destination: Path) -> None:
    from safetensors.torch import save_file

    if not architecture_unchanged(compressed, model):
        raise SlimscopeError("safetensors holds weights only, and this plan changes the "
                             "architecture (structured pruning or low-rank); write .pt, "
                             ".pt2 or .onnx instead")
    metadata = {k: v for k, v in model.metadata.items()
                if k in (ARCH_METADATA_KEY, INPUT_SHAPE_METADATA_KEY)}
    with atomic_path(destination) as temp:
        save_file(_state_dict(compressed), str(temp), metadata=metadata or None)
