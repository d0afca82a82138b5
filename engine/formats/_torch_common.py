"""Turning torch objects into the neutral model: tensor stores, layers, kinds and MACs.

Every torch-based adapter ends here: a live ``nn.Module`` (trusted pickle, TorchScript,
torch.export, a known architecture) goes through :func:`module_model`; a bare set of named
tensors (state_dict, safetensors) through :func:`weights_only_model`, which guesses layer kinds
from names and shapes because there is no graph to ask. Pickles that want more than tensors
are refused through :func:`untrusted_pickle_error`, naming what they would import.
"""

from __future__ import annotations

import contextlib
import logging
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from engine import zoo
from engine.errors import ModelLoadError, UntrustedPickleError, one_line
from engine.formats import guard
from engine.backends.base import Backend
from engine.macs import profile_module
from engine.model import Layer, Model, TensorSpec, TensorStore, layer_from_store, mark_shared
from engine.model import numpy_dtype_name

#: Said of every file that has weights but no graph to run.
WEIGHTS_ONLY_NOTE = (
    "weights only, no graph: weight compression and data-free sensitivity work; evaluation "
    "(accuracy, exact sensitivity) needs the model as ONNX, TorchScript, torch.export .pt2, a "
    "pickled module opened with --trust, or an architecture Slimscope knows"
)
#: Last name parts that mark a 2-D weight as an embedding table rather than a Linear layer.
_EMBEDDING_NAME = re.compile(r"emb|^wte$|^wpe$|^shared$", re.IGNORECASE)
#: Last name parts that mark a 1-D weight as a PReLU slope (facenet's `prelu1`, `prelu4_1`).
_PRELU_NAME = re.compile(r"prelu", re.IGNORECASE)
_NUMPY_INCOMPATIBLE = {torch.bfloat16} | {
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                      "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, name)
}


# -- tensors ------------------------------------------------------------------------------
def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view; dtypes numpy lacks (bfloat16, float8) become a float32 copy."""
    tensor = tensor.detach()
    if tensor.dtype in _NUMPY_INCOMPATIBLE:
        return tensor.to(torch.float32).numpy()
    return tensor.numpy()


def _storage_identity(tensor: torch.Tensor) -> tuple | None:
    """What makes two tensors the same data: storage, offset, shape, strides, dtype."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    address = tensor.untyped_storage().data_ptr()
    if not address:
        return None
    return (address, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def tensor_store(tensors: Mapping[str, torch.Tensor]) -> TensorStore:
    """A store over torch tensors; names that are the same storage alias the first name."""
    getters, shapes, dtypes, itemsizes, aliases = {}, {}, {}, {}, {}
    first_name: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        getters[name] = lambda t=tensor: tensor_to_numpy(t)
        shapes[name] = tuple(tensor.shape)
        dtypes[name] = numpy_dtype_name(tensor.dtype)
        itemsizes[name] = tensor.element_size()
        identity = _storage_identity(tensor)
        if identity is not None:
            if identity in first_name:
                aliases[name] = first_name[identity]
            else:
                first_name[identity] = name
    return TensorStore(getters, shapes, dtypes, itemsizes, aliases)


# -- kinds --------------------------------------------------------------------------------
def guess_kind(name: str, shape: Sequence[int], *, has_running_stats: bool,
               previous_kind: str | None = None) -> str | None:
    """The likely layer kind of a weight from its name and shape alone; None for no layer.

    A BatchNorm's dimensionality follows the layer before it (a Conv1d feeds BatchNorm1d). A
    1-D weight without running statistics is a LayerNorm, unless its name says PReLU (a PReLU's
    slopes look exactly like a norm's scale).
    """
    rank = len(shape)
    if rank in (3, 4, 5):
        return f"Conv{rank - 2}d"
    if rank == 2:
        last_part = name.rsplit(".", 1)[-1]
        return "Embedding" if _EMBEDDING_NAME.search(last_part) else "Linear"
    if rank == 1:
        if not has_running_stats:
            return "PReLU" if _PRELU_NAME.search(name.rsplit(".", 1)[-1]) else "LayerNorm"
        if previous_kind in ("Conv2d", "Conv3d"):
            return f"BatchNorm{previous_kind[4]}d"
        if previous_kind in ("Conv1d", "Linear"):
            return "BatchNorm1d"
        return "BatchNorm2d"
    return None


def state_dict_layers(store: TensorStore) -> list[Layer]:
    """Layers of a bare state dict: every `<prefix>.weight`, its kind guessed, in file order."""
    keys = set(store.keys())
    layers: list[Layer] = []
    previous_kind: str | None = None
    for key in store.keys():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "weight":
            continue
        dot = f"{prefix}." if prefix else ""
        kind = guess_kind(prefix or key, store.shapes[key],
                          has_running_stats=f"{dot}running_mean" in keys,
                          previous_kind=previous_kind)
        if kind is None:
            continue
        bias = f"{dot}bias"
        layers.append(layer_from_store(prefix or key, kind, store, key,
                                       bias if bias in keys else None))
        previous_kind = kind
    _mark_shared(layers, store)
    return layers


def module_kind(module: nn.Module) -> str:
    """The class name a user wrote: TorchScript keeps it as `original_name`."""
    if isinstance(module, torch.jit.ScriptModule):
        return str(module.original_name)
    return type(module).__name__


def module_layers(module: nn.Module, store: TensorStore,
                  kind_of: Callable[[str, nn.Module], str] | None = None) -> list[Layer]:
    """Layers of a live module: every submodule that owns a `weight` parameter directly, and
    every recurrent weight of LSTM/GRU/RNN modules (engine.methods.base.weight_layers)."""
    from engine.methods.base import weight_layers

    modules = dict(module.named_modules()) if kind_of is not None else {}
    layers: list[Layer] = []
    for found in weight_layers(module):
        kind = found.kind
        if kind_of is not None and not found.recurrent:
            kind = kind_of(found.owner, modules[found.owner])
        layers.append(layer_from_store(found.name, kind, store, found.weight_key, found.bias_key))
    _mark_shared(layers, store)
    return layers


def _mark_shared(layers: list[Layer], store: TensorStore) -> None:
    mark_shared(layers, lambda key: store.aliases.get(key, key))


# -- models -------------------------------------------------------------------------------
def _default_input_dtype(module: nn.Module) -> str:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return numpy_dtype_name(tensor.dtype)
    return "float32"


def module_model(
    path: Path,
    format_name: str,
    module: nn.Module,
    *,
    inputs: list[TensorSpec] | None = None,
    input_shape: tuple[int, ...] | None = None,
    kind_of: Callable[[str, nn.Module], str] | None = None,
    notes: list[str] | None = None,
    metadata: dict[str, str] | None = None,
    backend: "Backend | None" = None,
) -> Model:
    """A runnable Model around `module`; with static input shapes, also MACs and outputs.

    `input_shape` (one input) replaces the declared `inputs` for measuring when given; a
    forward pass that fails becomes a note, not an error, since inspection does not need it,
    and leaves the declared inputs in place.
    """
    state = module.state_dict(keep_vars=True)
    store = tensor_store(state)
    layers = module_layers(module, store, kind_of)
    notes = list(notes or [])
    declared = list(inputs or [])
    inputs = declared
    if input_shape is not None:
        known = inputs[0] if len(inputs) == 1 else None
        inputs = [TensorSpec(known.name if known else "input", tuple(input_shape),
                             known.dtype if known else _default_input_dtype(module))]
    outputs: list[TensorSpec] = []
    if inputs and all(spec.is_static for spec in inputs):
        weights = {layer.name: (layer.kind, state[layer.weight_key]) for layer in layers}
        try:
            profile = profile_module(module, inputs, weights)
        except Exception as exc:  # noqa: BLE001 - a model that will not run is still inspectable
            shapes = ", ".join(str(list(spec.shape)) for spec in inputs)
            notes.append(f"could not run the model on input {shapes}: {one_line(exc)}")
            inputs = declared or inputs
        else:
            inputs, outputs = profile.inputs, profile.outputs
            for layer in layers:
                layer.macs = profile.macs.get(layer.name)
    return Model(path=path, format=format_name, layers=layers, tensors=store, inputs=inputs,
                 outputs=outputs, module=module, notes=notes, metadata=dict(metadata or {}),
                 backend=backend)


def weights_only_model(
    path: Path,
    format_name: str,
    store: TensorStore,
    *,
    input_shape: tuple[int, ...] | None = None,
    notes: list[str] | None = None,
    metadata: dict[str, str] | None = None,
) -> Model:
    """A Model over named tensors with no graph: layers guessed, nothing runnable."""
    inputs = [TensorSpec("input", tuple(input_shape))] if input_shape else []
    return Model(path=path, format=format_name, layers=state_dict_layers(store), tensors=store,
                 inputs=inputs, notes=[WEIGHTS_ONLY_NOTE, *(notes or [])],
                 metadata=dict(metadata or {}))


def architecture_model(
    path: Path,
    format_name: str,
    arch: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    input_shape: tuple[int, ...] | None,
    metadata: dict[str, str] | None = None,
) -> Model:
    """Rebuild a known architecture and load `tensors` into it strictly: a runnable Model."""
    module = zoo.build(arch)
    problem = _state_dict_mismatch(module, tensors)
    if problem:
        raise ModelLoadError(f"{path.name}: its weights do not fit the architecture {arch!r} "
                             f"it names: {problem}")
    module.load_state_dict(dict(tensors), strict=True)
    module.eval()
    return module_model(path, format_name, module, input_shape=input_shape,
                        notes=[f"rebuilt as the known architecture {arch!r}"], metadata=metadata)


def _state_dict_mismatch(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps `tensors` from loading strictly into `module`, said briefly; None if nothing."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    problems = []
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    resized = [f"{key} is {list(tensors[key].shape)}, not {list(shape)}"
               for key, shape in expected.items()
               if key in tensors and tuple(tensors[key].shape) != shape]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("size", resized)):
        if items:
            problems.append(f"{label}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}")
    return "; ".join(problems) or None


# -- pickles that would run code -----------------------------------------------------------
#: Globals every torch.save pickle uses to rebuild tensors; not worth naming in a warning.
_ROUTINE_GLOBAL_PREFIXES = ("torch._utils.", "torch._tensor.", "torch.storage.")
_ROUTINE_GLOBALS = frozenset({
    "collections.OrderedDict", "torch.device", "torch.Size", "torch.nn.parameter.Parameter",
    "__builtin__.set", "builtins.set", "torch.FloatStorage", "torch.DoubleStorage",
    "torch.HalfStorage", "torch.BFloat16Storage", "torch.LongStorage", "torch.IntStorage",
    "torch.ShortStorage", "torch.CharStorage", "torch.ByteStorage", "torch.BoolStorage",
})
#: A legacy torch.save file is a handful of pickles in a row before the raw storages.
_MAX_PICKLES_IN_STREAM = 6
_GLOBALS_NAMED = 3


def check_archive(path: Path) -> None:
    """guard.check_zip on a torch zip before torch's C++ reader inflates any member.

    torch reads the first of two same-named members and inflates whatever size a member claims.
    """
    size = guard.regular_file(path).st_size
    try:
        with zipfile.ZipFile(path) as archive:
            guard.check_zip(archive, size, path.name)
    except zipfile.BadZipFile:
        raise ModelLoadError(f"{guard.quote(path.name)}: the zip archive is damaged or "
                             "truncated") from None


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Keep torch's warnings (e.g. about protocol 4/5 pickles) and export log lines off stderr:
    the user is told one line, by us."""
    loggers = [logging.getLogger(name) for name in ("torch._export", "torch.export")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def is_weights_only_refusal(error: BaseException) -> bool:
    """Whether torch.load(weights_only=True) refused the file, rather than failed to read it."""
    return "weights only load failed" in str(error).lower()


def untrusted_pickle_error(file_name: str, referenced: Iterable[str]) -> UntrustedPickleError:
    """The one-line refusal, naming up to three of the globals the pickle would import."""
    names = [name for name in dict.fromkeys(referenced)
             if name not in _ROUTINE_GLOBALS and not name.startswith(_ROUTINE_GLOBAL_PREFIXES)]
    shown = ", ".join(names[:_GLOBALS_NAMED]) + (", ..." if len(names) > _GLOBALS_NAMED else "")
    refs = f" (it references {shown})" if shown else ""
    return UntrustedPickleError(
        f"{file_name} is a pickled object that can run code when loaded{refs}; open it only if "
        "you trust its source: pass --trust on the command line or confirm in the app"
    )


def referenced_globals(source: Path | IO[bytes]) -> list[str]:
    """Every `module.name` the pickles in a torch.save file (zip or legacy) would import.

    Read by walking opcodes, never by unpickling; unreadable input yields what was found so far.
    """
    names: dict[str, None] = {}
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        with archive.open(member) as stream:
                            names.update(dict.fromkeys(_globals_in_stream(stream)))
        elif isinstance(source, Path):
            with source.open("rb") as stream:
                names.update(dict.fromkeys(_globals_in_stream(stream, _MAX_PICKLES_IN_STREAM)))
        else:
            source.seek(0)
            names.update(dict.fromkeys(_globals_in_stream(source, _MAX_PICKLES_IN_STREAM)))
    except (OSError, zipfile.BadZipFile):
        pass
    return list(names)


def _globals_in_stream(stream: IO[bytes], max_pickles: int = 1) -> Iterator[str]:
    """Yield GLOBAL / STACK_GLOBAL / INST targets of consecutive pickles in `stream`."""
    for _ in range(max_pickles):
        recent: list[Any] = []  # what each pushing opcode left on top: a string, or None
        memo: dict[Any, Any] = {}
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    yield str(arg).replace(" ", ".")
                    recent.append(None)
                elif name == "STACK_GLOBAL":
                    if len(recent) >= 2 and isinstance(recent[-1], str):
                        yield f"{recent[-2]}.{recent[-1]}"
                    recent.append(None)
                elif "UNICODE" in name or name.endswith("STRING"):
                    recent.append(arg)
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = recent[-1] if recent else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(arg))
                elif opcode.stack_after:
                    recent.append(None)
        except Exception:  # noqa: BLE001 - past the pickles lies raw tensor data; stop there
            return
