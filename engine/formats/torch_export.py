"""torch.export archives (``.pt2`` from ``torch.export.save``): an ATen graph plus its weights.

The zip layout is `<root>/archive_format`, `<root>/models/*.json` and `<root>/data/weights/...`
(older torch wrote `serialized_exported_program.json`). Layer kinds come from the graph's
operators, because ``ExportedProgram.module()`` keeps weights on plain ``nn.Module`` holders
that no longer say what they were. Input shapes come from the graph's placeholders.

``torch.export.load`` can run code from the archive (pickles, imports, ``eval`` of shape
expressions, guard code), so it runs only for files the user trusts. Any other archive is read by
:mod:`engine.formats.pt2_reader`, which builds the same runnable program from the raw tensors and
the checked JSON graph, and refuses what it cannot build without running the file's code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.backends.torch_module import ExportedProgramBackend
from engine.formats import LoadOptions
from engine.methods.base import KIND_ATTRIBUTE
from engine.formats._torch_common import check_archive, guess_kind, module_model, quiet_torch
from engine.formats.pt2_reader import read_program
from engine.model import Model, TensorSpec, numpy_dtype_name

NAME = "torch-export"

#: ATen operator -> (layer kind, or None to derive it from ranks; index of its weight argument).
_WEIGHT_OPS: dict[str, tuple[str | None, int]] = {
    "conv1d": ("Conv1d", 1),
    "conv2d": ("Conv2d", 1),
    "conv3d": ("Conv3d", 1),
    "conv_transpose1d": ("ConvTranspose1d", 1),
    "conv_transpose2d": ("ConvTranspose2d", 1),
    "conv_transpose3d": ("ConvTranspose3d", 1),
    "convolution": (None, 1),
    "linear": ("Linear", 1),
    "embedding": ("Embedding", 0),
    "batch_norm": (None, 1),
    "native_batch_norm": (None, 1),
    "_native_batch_norm_legit_no_training": (None, 1),
    "_native_batch_norm_legit_functional": (None, 1),
    "layer_norm": ("LayerNorm", 2),
    "native_layer_norm": ("LayerNorm", 2),
    "group_norm": ("GroupNorm", 2),
    "prelu": ("PReLU", 1),
    "_prelu_kernel": ("PReLU", 1),
}
_ARCHIVE_MARKERS = ("archive_format", "serialized_exported_program.json")


def match(path: Path, head: bytes, zip_names: list[str]) -> bool:
    return any(name.rsplit("/", 1)[-1] in _ARCHIVE_MARKERS for name in zip_names)


def load(path: Path, options: LoadOptions) -> Model:
    if options.trust:
        check_archive(path)
        with quiet_torch():
            program = torch.export.load(str(path))
    else:
        program = read_program(path)
    kinds = _layer_kinds(program)
    with quiet_torch():
        module = program.module()

    def kind_of(name: str, submodule: nn.Module) -> str:
        weight = submodule.get_parameter("weight")
        buffers = dict(submodule.named_buffers(recurse=False))
        kind = kinds.get(name) or guess_kind(
            name, tuple(weight.shape), has_running_stats="running_mean" in buffers
        ) or "Tensor"
        setattr(submodule, KIND_ATTRIBUTE, kind)  # methods ask the layer; copies keep it
        return kind

    inputs = _user_inputs(program)
    static_batch = _static_batch(inputs)
    notes = [f"exported for a fixed batch of {static_batch}: evaluation feeds {static_batch} "
             "sample(s) at a time"] if static_batch else []
    return module_model(path, NAME, module, inputs=inputs, input_shape=options.input_shape,
                        kind_of=kind_of, notes=notes,
                        backend=ExportedProgramBackend(module, program, static_batch))


def _static_batch(inputs: list[TensorSpec]) -> int | None:
    """The batch size a program was exported for when every input is fixed: the first input's
    first size (a state input may carry its batch on another axis); None if any is dynamic."""
    if not inputs or not all(spec.is_static for spec in inputs) or not inputs[0].shape:
        return None
    size = inputs[0].shape[0]
    return size if isinstance(size, int) and size > 0 else None


def _rank(node: object) -> int | None:
    value = getattr(node, "meta", {}).get("val")
    return value.dim() if isinstance(value, torch.Tensor) else None


def _layer_kinds(program: torch.export.ExportedProgram) -> dict[str, str]:
    """Layer name -> kind, from the operators that read each weight.

    The layer is the module that called the operator (its `nn_module_stack`), falling back to
    the parameter's own path: with tied weights the graph names one parameter for both uses,
    and only the calling module tells the embedding lookup from the output projection.
    """
    parameters = program.graph_signature.inputs_to_parameters
    by_caller: dict[str, str] = {}
    by_parameter: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = node.target.overloadpacket.__name__
        if op not in _WEIGHT_OPS:
            continue
        kind, index = _WEIGHT_OPS[op]
        weight = node.args[index] if len(node.args) > index else None
        target = parameters.get(getattr(weight, "name", ""))
        if target is None or not target.endswith("weight"):
            continue
        kind = kind or _derived_kind(op, node, weight)
        by_parameter.setdefault(target.removesuffix("weight").removesuffix("."), kind)
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            caller_path = list(stack.values())[-1][0]
            by_caller.setdefault(caller_path, kind)
    return {**by_parameter, **by_caller}


def _derived_kind(op: str, node: torch.fx.Node, weight: torch.fx.Node) -> str:
    """Kinds the operator leaves open: BatchNorm by input rank, convolution by weight rank."""
    if op == "convolution":
        rank = _rank(weight) or 4
        transposed = len(node.args) > 6 and bool(node.args[6])
        return f"{'ConvTranspose' if transposed else 'Conv'}{rank - 2}d"
    rank = _rank(node.args[0]) or 4
    return f"BatchNorm{max(rank - 2, 1)}d"


def _user_inputs(program: torch.export.ExportedProgram) -> list[TensorSpec]:
    """The placeholders a caller feeds, with symbolic dimensions as strings ('s0')."""
    user_inputs = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        value = node.meta.get("val")
        is_user_input = node.op == "placeholder" and node.name in user_inputs
        if is_user_input and isinstance(value, torch.Tensor):
            shape = tuple(int(d) if isinstance(d, int) else str(d) for d in value.shape)
            specs.append(TensorSpec(node.name, shape, numpy_dtype_name(value.dtype)))
    return specs
