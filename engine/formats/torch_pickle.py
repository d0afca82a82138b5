"""Files written by ``torch.save``: state dicts, checkpoints, and whole pickled modules.

Loading is weights-only first, which can build tensors and plain containers but never calls
anything the pickle names. A file that needs more (a pickled ``nn.Module``, or a payload that
would run a shell command) is refused with :class:`UntrustedPickleError` unless the user said
they trust it; the refusal names what the file would import, read without running it.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import zoo
from engine.errors import ModelLoadError
from engine.formats import LoadOptions
from engine.formats._torch_common import (
    architecture_model,
    check_archive,
    is_weights_only_refusal,
    module_model,
    quiet_torch,
    referenced_globals,
    tensor_store,
    untrusted_pickle_error,
    weights_only_model,
)
from engine.model import Model

NAME = "torch-pickle"
STATE_DICT_FORMAT = "torch-state-dict"
MODULE_FORMAT = "torch-module"

#: Checkpoint keys under which training scripts commonly nest the model's weights.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network",
                   "model_ema", "ema", "weights", "params")
#: Checkpoint keys holding training state, never model weights.
TRAINING_STATE_KEYS = ("optimizer", "optimizer_state_dict", "optim", "scheduler",
                       "lr_scheduler", "scaler", "grad_scaler")
_PICKLE_PROTOCOL_HEADS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def match(path: Path, head: bytes, zip_names: list[str]) -> bool:
    """A zip holding `data.pkl`, a damaged zip (to say so), or a bare pickle stream."""
    if head.startswith(b"PK\x03\x04"):
        return not zip_names or any(name.rsplit("/", 1)[-1] == "data.pkl" for name in zip_names)
    return head.startswith(_PICKLE_PROTOCOL_HEADS)


def load(path: Path, options: LoadOptions) -> Model:
    is_zip = zipfile.is_zipfile(path)
    with path.open("rb") as handle:
        damaged_zip = not is_zip and handle.read(4) == b"PK\x03\x04"
    if damaged_zip:
        raise ModelLoadError(f"{path.name}: the zip archive is damaged or truncated")
    if is_zip:
        check_archive(path)
    try:
        with quiet_torch():
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if not is_weights_only_refusal(exc):
            raise
        if not options.trust:
            raise untrusted_pickle_error(path.name, referenced_globals(path)) from None
        with quiet_torch():
            obj = torch.load(str(path), map_location="cpu", weights_only=False, mmap=is_zip)
        module = _find_module(obj)
        if module is not None:
            module.eval()
            return module_model(path, MODULE_FORMAT, module, input_shape=options.input_shape)
    return _state_dict_model(path, obj, options)


def _state_dict_model(path: Path, obj: Any, options: LoadOptions) -> Model:
    tensors = find_state_dict(obj)
    if not tensors:
        raise ModelLoadError(f"{path.name}: holds a {type(obj).__name__} with no tensors, "
                             "not model weights")
    arch = obj.get(zoo.ARCH_METADATA_KEY) if isinstance(obj, Mapping) else None
    if isinstance(arch, str) and arch in zoo.ARCHITECTURES:
        return architecture_model(path, STATE_DICT_FORMAT, arch, tensors,
                                  input_shape=options.input_shape)
    return weights_only_model(path, STATE_DICT_FORMAT, tensor_store(tensors),
                              input_shape=options.input_shape)


def find_state_dict(obj: Any, depth: int = 0) -> dict[str, torch.Tensor]:
    """The model's named tensors inside whatever torch.save stored.

    A checkpoint is searched under the usual model keys first; failing that, the tensors of the
    mapping and of its nested mappings are gathered under dotted names, leaving training state
    (optimizer, scheduler) out.
    """
    if not isinstance(obj, Mapping) or depth > 3:
        return {}
    for key in STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            found = find_state_dict(obj[key], depth + 1)
            if found:
                return found
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        elif isinstance(value, Mapping) and key not in TRAINING_STATE_KEYS:
            for inner, tensor in find_state_dict(value, depth + 1).items():
                tensors[f"{key}.{inner}"] = tensor
    return tensors


def _find_module(obj: Any) -> nn.Module | None:
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None
