"""One small model file per backend the engine opens, for the app's capability tests.

Each maker writes a real file (TorchScript, torch.export, ONNX, bare safetensors) with the
formats' own writers; :func:`model_of_each_kind` gives them all, in the order the app test opens
them, with the bundled demo (a plain torch module) first.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

import factories


def write_bare_safetensors(folder: Path, name: str = "bare_weights.safetensors") -> Path:
    """TinyCNN's weights with no metadata at all (no architecture, no input shape): weights only.
    Keys sit under ``backbone.``, as checkpoints of a bigger model do, so its layer names differ
    from every other stand-in's."""
    path = folder / name
    state = {f"backbone.{key}": value.detach().contiguous()
             for key, value in factories.tiny_cnn().state_dict().items()}
    save_file(state, str(path))
    return path


def write_static_torch_export(folder: Path) -> Path:
    """A torch.export program traced with batch 1 and no dynamic dimension: a static batch."""
    return factories.write_torch_export(folder)


def model_of_each_kind(folder: Path) -> dict[str, Path]:
    """kind -> file: the demo (torch), TorchScript, torch.export (.pt2, batch 1), ONNX and
    weights-only safetensors."""
    from gui.preview import demo_model_path

    demo = demo_model_path()
    if demo is None:
        raise RuntimeError("the demo model is not built")
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "torch": demo,
        "torchscript": factories.write_torchscript(folder),
        "torch.export": write_static_torch_export(folder),
        "onnx": factories.write_onnx(folder),
        "weights": write_bare_safetensors(folder),
    }
