"""TorchScript archives (``torch.jit.save``): a runnable module whose code travels with it.

The zip holds `<root>/code/` (the serialized TorchScript source) and `<root>/constants.pkl`,
which a plain ``torch.save`` archive never has. Loading runs no Python pickle globals: the code
is TorchScript, interpreted by torch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.backends.torch_module import TorchScriptBackend
from engine.formats import LoadOptions
from engine.formats._torch_common import check_archive, module_model, quiet_torch
from engine.model import Model

NAME = "torchscript"


def match(path: Path, head: bytes, zip_names: list[str]) -> bool:
    has_code = any("/code/" in name for name in zip_names)
    has_constants = any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in zip_names)
    return has_code and has_constants


def load(path: Path, options: LoadOptions) -> Model:
    check_archive(path)  # torch's C++ reader would inflate a zip bomb
    with quiet_torch():  # e.g. torch deprecating TorchScript; files that exist still need reading
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    return module_model(path, NAME, module, input_shape=options.input_shape,
                        backend=TorchScriptBackend(module))
