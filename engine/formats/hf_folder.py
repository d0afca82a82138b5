"""Hugging Face checkpoint folders: ``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin`` (or their sharded forms), the layout the transformer ecosystem ships.

With the optional ``transformers`` package the folder opens as a runnable torch module, built
from the config by transformers' own classes and never by code from the folder: a config that
names custom code (``auto_map``) opens weights-only. Without transformers, or when the model
cannot be built, the same tensors open weights-only, as a bare safetensors file would.

Every file is reached through :func:`guard.inside_folder`: a symlink out of the folder is
refused, except a Hugging Face cache snapshot's link into its own repository's ``blobs`` (see
:func:`inside_checkpoint`). Each is read by the project's own validated readers: the config
with :func:`engine.parsing.read_json` under a small size limit, safetensors through the
safetensors adapter's header checks, a ``pytorch_model.bin`` with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pickle
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, Sequence

from engine.backends.base import FX_TRACE, GRAPH_SURGERY
from engine.backends.torch_module import TorchModuleBackend
from engine.errors import FormatError, one_line
from engine.formats.guard import inside_folder, quote, regular_file
from engine.model import Model, TensorSpec, TensorStore
from engine.parsing import read_json

if TYPE_CHECKING:
    import torch
    from torch import nn

    from engine.formats import LoadOptions

NAME = "hf-folder"
CONFIG_FILE = "config.json"
#: Largest config.json read. Real ones are 0.5-60 KB (multimodal configs are the biggest).
MAX_CONFIG_BYTES = 1 << 20
#: Largest shard index read; a 400-billion-parameter model's index is about 2 MB.
MAX_INDEX_BYTES = 16 << 20
#: Single-file weights, in the order transformers itself prefers them.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Shard indexes (``weight_map``: tensor name -> shard file), same order.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Tokens per sequence for counting MACs when the user gives no --input-shape.
DEFAULT_SEQUENCE = 128
#: Inputs a text model's forward takes, in the order our positional forward takes them.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INSTALL_NOTE = ('install the Hugging Face extra (pip install "slimscope[hf]") to open this '
                "folder as a runnable model")


@dataclass
class FolderModel(Model):
    """A Model read from several files; its size on disk is theirs, not the folder entry's."""

    source_files: tuple[Path, ...] = ()

    @property
    def file_bytes(self) -> int:
        return sum(file.stat().st_size for file in self.source_files if file.is_file())


def load(path: Path, options: "LoadOptions") -> Model:
    return open_folder(path, options, use_transformers=transformers_installed())


def transformers_installed() -> bool:
    """Whether the optional ``transformers`` package can be imported here."""
    try:
        importlib.import_module("transformers")
    except Exception:  # noqa: BLE001 - missing, or installed against another torch: unusable
        return False
    return True


def open_folder(path: Path, options: "LoadOptions", *, use_transformers: bool) -> Model:
    """The folder as a runnable model when `use_transformers` and the config allow, else as
    weights only with one note saying why (what :func:`load` does without transformers)."""
    config = read_config(path)
    tensors = read_weights(path)
    reason = _not_runnable_reason(config)
    if reason is None and not use_transformers:
        reason = INSTALL_NOTE
    if reason is None:
        try:
            return runnable_model(path, config, tensors, options)
        except (ImportError, ValueError, TypeError, KeyError, AttributeError, RuntimeError,
                OSError) as exc:  # transformers' many ways to say "cannot build this"
            reason = (f"transformers could not build it ({_build_problem(exc)}); opened as "
                      "weights only")
    return weights_model(path, config, tensors, reason)


def _build_problem(error: BaseException) -> str:
    """transformers' complaint in a few words; its size-mismatch error points at a report we
    keep off stderr, so that one is said in our words."""
    if "ignore_mismatched_sizes" in str(error):
        return "the weights do not have the shapes config.json gives"
    return one_line(error)[:160]


# -- files ------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict[str, Any]:
    """config.json, inside the folder, bounded in size and nesting, with a string model_type."""
    where = quote(folder.name or str(folder))
    config_path = inside_checkpoint(folder, CONFIG_FILE, f"{where}: {CONFIG_FILE}")
    config = _read_json(folder, config_path, "config", MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise FormatError(f"{where}: {CONFIG_FILE} is not a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise FormatError(f"{where}: {CONFIG_FILE} has no model_type, so this is not a Hugging "
                          "Face model folder")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(
            isinstance(name, str) for name in architectures)):
        raise FormatError(f"{where}: {CONFIG_FILE}: architectures {quote(architectures)} is "
                          "not a list of class names")
    return config


def _read_json(folder: Path, path: Path, what: str, limit: int) -> Any:
    """read_json's bounded parse, its one-line refusal prefixed with the folder's name."""
    try:
        return read_json(path, what=what, limit=limit, error=FormatError)
    except FormatError as exc:
        raise FormatError(f"{quote(folder.name or str(folder))}: {exc}") from None


@dataclass
class FolderTensors:
    """The folder's weights: one store over every file, and the files themselves."""

    store: TensorStore
    files: tuple[Path, ...]
    #: Per file, its kind ("safetensors" or "torch") for loading into a module.
    kinds: dict[Path, str]
    #: Tensors already in memory (a pytorch_model.bin is unpickled once, weights only).
    loaded: dict[str, "torch.Tensor"]


def read_weights(folder: Path) -> FolderTensors:
    """The folder's weight files, each resolved inside it and read by a validated reader."""
    where = quote(folder.name or str(folder))
    for single, index in zip(WEIGHT_FILES, INDEX_FILES):
        if os.path.lexists(folder / single):
            return _read_files(folder, [single])
        if os.path.lexists(folder / index):
            return _read_files(folder, _shards(folder, index))
    raise FormatError(f"{where}: has {CONFIG_FILE} but no weights ({', '.join(WEIGHT_FILES)} "
                      "or a sharded index)")


def _shards(folder: Path, index: str) -> list[str]:
    where = f"{quote(folder.name or str(folder))}: {index}"
    data = _read_json(folder, inside_checkpoint(folder, index, where), "shard index",
                      MAX_INDEX_BYTES)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(value, str) for value in weight_map.values()):
        raise FormatError(f"{where}: weight_map must map tensor names to shard file names")
    return list(dict.fromkeys(weight_map.values()))


def _read_files(folder: Path, names: Sequence[str]) -> FolderTensors:
    from engine.formats import LoadOptions, safetensors_format

    stores: list[TensorStore] = []
    files: list[Path] = []
    kinds: dict[Path, str] = {}
    loaded: dict[str, torch.Tensor] = {}
    for name in names:
        where = f"{quote(folder.name or str(folder))}/{quote(name)}"
        file = inside_checkpoint(folder, name, where)
        size = regular_file(file).st_size
        with file.open("rb") as handle:
            head = handle.read(16)
        if safetensors_format.match(file, head, []):
            stores.append(safetensors_format.load(file, LoadOptions()).tensors)
            kinds[file] = "safetensors"
        elif size:
            tensors = _weights_only_pickle(file, where)
            from engine.formats._torch_common import tensor_store

            stores.append(tensor_store(tensors))
            loaded.update(tensors)
            kinds[file] = "torch"
        else:
            raise FormatError(f"{where}: the weights file is empty")
        files.append(file)
    return FolderTensors(_merged(stores), tuple(files), kinds, loaded)


def inside_checkpoint(folder: Path, name: str, where: str) -> Path:
    """:func:`guard.inside_folder`, plus the one layout where weights live next door.

    The Hugging Face cache keeps ``models--ORG--NAME/snapshots/REVISION/model.safetensors`` as
    a symlink to ``models--ORG--NAME/blobs/HASH``; a snapshot folder is what users point at.
    Such a link is followed only into that same repository's ``blobs`` folder, fully resolved.
    """
    try:
        return inside_folder(folder, name, where)
    except FormatError:
        snapshot = Path(os.path.realpath(folder))
        repository = snapshot.parent.parent
        target = Path(os.path.realpath(snapshot / name))
        if (snapshot.parent.name == "snapshots" and repository.name.startswith("models--")
                and not os.path.isabs(name) and target.parent == repository / "blobs"):
            return target
        raise


def _weights_only_pickle(file: Path, where: str) -> dict[str, "torch.Tensor"]:
    """A pytorch_model.bin's tensors, unpickled with weights_only=True and nothing else.

    A file that needs more is refused outright: --trust is for a model file the user chose,
    not for a pickle found inside a folder of weights.
    """
    import torch

    from engine.formats._torch_common import (  # noqa: PLC2701 - the same package's own lists
        _ROUTINE_GLOBAL_PREFIXES,
        _ROUTINE_GLOBALS,
        check_archive,
        is_weights_only_refusal,
        quiet_torch,
        referenced_globals,
    )
    from engine.formats.torch_pickle import find_state_dict

    def is_routine_global(name: str) -> bool:  # what every torch.save pickle imports
        return name in _ROUTINE_GLOBALS or name.startswith(_ROUTINE_GLOBAL_PREFIXES)

    is_zip = zipfile.is_zipfile(file)
    if is_zip:
        check_archive(file)
    try:
        with quiet_torch():
            obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not is_weights_only_refusal(exc):
            raise FormatError(f"{where}: not a readable PyTorch weights file "
                              f"({one_line(exc)[:120]})") from None
        unusual = [name for name in referenced_globals(file) if not is_routine_global(name)]
        names = ", ".join(unusual[:3]) or "objects other than tensors"
        raise FormatError(f"{where}: holds a pickle that would import {quote(names)}; Slimscope "
                          "reads a model folder's weights as plain tensors only (convert it to "
                          "model.safetensors)") from None
    tensors = find_state_dict(obj)
    if not tensors:
        raise FormatError(f"{where}: holds no tensors")
    return tensors


def _merged(stores: list[TensorStore]) -> TensorStore:
    """One store over several shards; a tensor name in two shards is refused."""
    if len(stores) == 1:
        return stores[0]
    owner: dict[str, TensorStore] = {}
    for store in stores:
        for key in store.keys():
            if key in owner:
                raise FormatError(f"tensor {quote(key)} is stored in two shards")
            owner[key] = store
    return TensorStore(
        lambda key: owner[key].get(key),
        shapes={key: store.shapes[key] for key, store in owner.items()},
        dtypes={key: store.dtypes[key] for key, store in owner.items()},
        itemsizes={key: store.itemsizes[key] for key, store in owner.items()},
        aliases={alias: target for store in stores for alias, target in store.aliases.items()},
    )


# -- weights only -------------------------------------------------------------------------------
def _not_runnable_reason(config: Mapping[str, Any]) -> str | None:
    """Why transformers must not build this model, before asking it; None if it may."""
    if "auto_map" in config:
        return ("its config asks for custom code (auto_map); Slimscope never runs code from a "
                "model folder, so it opens as weights only")
    return None


def weights_model(folder: Path, config: Mapping[str, Any], tensors: FolderTensors,
                  reason: str) -> Model:
    """The folder as named tensors, layers guessed from names and shapes, with one note why."""
    from engine.formats._torch_common import weights_only_model

    model = weights_only_model(folder, NAME, tensors.store, notes=[reason],
                               metadata=_metadata(config))
    return _folder_model(model, tensors.files)


def _metadata(config: Mapping[str, Any]) -> dict[str, str]:
    metadata = {"hf.model_type": str(config.get("model_type"))}
    architectures = config.get("architectures") or []
    if architectures:
        metadata["hf.architecture"] = str(architectures[0])[:80]
    return metadata


def _folder_model(model: Model, files: Sequence[Path]) -> FolderModel:
    values = {field.name: getattr(model, field.name) for field in fields(Model)}
    return FolderModel(**values, source_files=tuple(files))


# -- runnable ---------------------------------------------------------------------------------
class TransformersBackend(TorchModuleBackend):
    """A transformers model: a plain nn.Module, minus what its attention layout forbids."""

    name: ClassVar[str] = "transformers"
    capabilities: ClassVar[frozenset[str]] = TorchModuleBackend.capabilities - {
        GRAPH_SURGERY, FX_TRACE}
    reasons: ClassVar[Mapping[str, str]] = {
        GRAPH_SURGERY: "structured pruning of a transformer must remove whole attention heads, "
                       "which Slimscope does not do yet; unstructured, N:M and quantization work",
        FX_TRACE: "transformers models do not trace with plain torch.fx (the exact sweep runs "
                  "whole-model passes instead)",
    }


def runnable_model(folder: Path, config: Mapping[str, Any], tensors: FolderTensors,
                   options: "LoadOptions") -> Model:
    """Build the model class the config names from transformers itself and load the weights."""
    from engine.formats._torch_common import module_model

    model_class, class_note = _model_class(config)
    hf_config = _hf_config(config)
    state = _torch_state(tensors)
    with _quiet_transformers():
        module, info = model_class.from_pretrained(
            None, config=hf_config, state_dict=state, local_files_only=True,
            trust_remote_code=False, output_loading_info=True, **_no_hub_kernels())
    del state
    module.eval()
    names = _input_names(module, config)
    module = positional(module, names)
    notes = [f"built as transformers {type(module).__name__} from config.json (no code from "
             "the folder runs)"]
    if class_note:
        notes.append(class_note)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        notes.append(f"{len(missing)} weights are not in the checkpoint and were initialised "
                     f"at random, e.g. {quote(missing[0])}")
    profile_inputs, sequence = _profile_inputs(module, config, names, options.input_shape)
    model = module_model(folder, NAME, module, inputs=profile_inputs, notes=notes,
                         metadata=_metadata(config), backend=TransformersBackend(module))
    if sequence is not None:
        if model.macs:
            model.notes.append(f"MACs are for one sequence of {sequence} tokens")
        model.inputs = [TensorSpec(spec.name, ("batch", "sequence"), spec.dtype)
                        for spec in profile_inputs]
        model.outputs = [TensorSpec(spec.name, _dynamic(spec.shape, sequence), spec.dtype)
                         for spec in model.outputs]
    return _folder_model(model, tensors.files)


def _no_hub_kernels() -> dict[str, bool]:
    """transformers 5 can fetch compiled kernels from the Hub; never (4.x has no such option
    and would pass an unknown keyword on to the model's constructor)."""
    import transformers

    major = transformers.__version__.split(".", 1)[0]
    return {"use_kernels": False} if major.isdigit() and int(major) >= 5 else {}


def _dynamic(shape: Sequence[int | str | None], sequence: int) -> tuple[int | str | None, ...]:
    """An output shape measured at batch 1 and `sequence` tokens, with those axes named."""
    return tuple("batch" if axis == 0 else "sequence" if axis == 1 and dim == sequence else dim
                 for axis, dim in enumerate(shape))


def _model_class(config: Mapping[str, Any]) -> tuple[type, str | None]:
    """transformers' class for the config: its first architecture if transformers knows the
    name as a model class, else the base model of its model_type. Never a class from the folder.
    """
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    model_type = config["model_type"]
    if model_type not in configuration_auto.CONFIG_MAPPING_NAMES:
        raise ValueError(f"model_type {quote(model_type)} is not one transformers "
                         f"{transformers.__version__} knows")
    known: set[str] = set()
    for attribute in dir(modeling_auto):
        if attribute.endswith("_MAPPING_NAMES") and attribute != "CONFIG_MAPPING_NAMES":
            for value in getattr(modeling_auto, attribute).values():
                known.update([value] if isinstance(value, str) else value)
    architectures = config.get("architectures") or []
    wanted = architectures[0] if architectures else None
    if wanted in known:
        return getattr(transformers, wanted), None
    base = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    if not isinstance(base, str):
        raise ValueError(f"transformers has no base model for model_type {quote(model_type)}")
    note = (f"architecture {quote(wanted)} is not a transformers class; opened as {base}"
            if wanted else None)
    return getattr(transformers, base), note


def _hf_config(config: Mapping[str, Any]) -> Any:
    """transformers' config object from the dict we parsed ourselves (no second file read)."""
    from transformers import AutoConfig

    values = {key: value for key, value in config.items() if key != "model_type"}
    with _quiet_transformers():
        return AutoConfig.for_model(config["model_type"], **values)


def _torch_state(tensors: FolderTensors) -> dict[str, "torch.Tensor"]:
    """Torch tensors in memory of their own (a module must never write into a read-only map).

    Safetensors files were validated by our reader already; the safetensors library then
    copies them out, keeping bfloat16 / float8 as they are.
    """
    from safetensors.torch import load_file

    state = dict(tensors.loaded)
    for file, kind in tensors.kinds.items():
        if kind == "safetensors":
            state.update(load_file(str(file)))
    return state


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports on stderr: the user gets our one-line notes."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# -- the positional forward ---------------------------------------------------------------------
def _input_names(module: "nn.Module", config: Mapping[str, Any]) -> list[str]:
    """The text inputs this model's forward takes, in TEXT_INPUTS order.

    token_type_ids only where the config has a token-type table (BERT-likes); other models
    accept the argument but do nothing useful with it.
    """
    accepted = inspect.signature(module.forward).parameters
    names = [name for name in TEXT_INPUTS if name in accepted]
    if "token_type_ids" in names and not config.get("type_vocab_size"):
        names.remove("token_type_ids")
    return names if "input_ids" in names else []


def positional(module: "nn.Module", input_names: Sequence[str]) -> "nn.Module":
    """`module` with a forward that takes `input_names` positionally and returns one tensor.

    Slimscope's runners and MAC counter call ``module(*arrays)`` and want a tensor back; a
    transformers forward takes keywords and returns a ModelOutput. A wrapper module would add a
    prefix to every parameter name, and the plan, the sensitivity file and exported state dicts
    must keep transformers' names. So the instance's class is swapped for a subclass made here,
    whose only change is forward: the parameters, the state dict keys and ``isinstance`` all stay
    as they were. Copies (``copy.deepcopy``) keep the subclass.
    """
    if not input_names:
        return module
    original = type(module)
    subclass = _positional_class(original, tuple(input_names))
    module.__class__ = subclass
    return module


_POSITIONAL_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _positional_class(original: type, input_names: tuple[str, ...]) -> type:
    key = (original, input_names)
    if key in _POSITIONAL_CLASSES:
        return _POSITIONAL_CLASSES[key]
    extra = {"use_cache": False} if "use_cache" in inspect.signature(
        original.forward).parameters else {}

    def forward(self: Any, *inputs: "torch.Tensor") -> "torch.Tensor":
        if len(inputs) > len(input_names):
            raise TypeError(f"this model takes at most {len(input_names)} inputs "
                            f"({', '.join(input_names)}), not {len(inputs)}")
        named = {name: value for name, value in zip(input_names, inputs) if value is not None}
        return _first_tensor(original.forward(self, **named, **extra))

    import torch

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          default=inspect.Parameter.empty if i == 0 else None,
                          annotation=torch.Tensor)
        for i, name in enumerate(input_names)]
    forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    forward.__doc__ = f"{original.__name__}.forward on positional {', '.join(input_names)}."
    subclass = type(original.__name__, (original,), {
        "forward": forward, "__module__": original.__module__,
        "__qualname__": original.__qualname__, "slimscope_input_names": input_names})
    _POSITIONAL_CLASSES[key] = subclass
    return subclass


def _first_tensor(output: Any) -> "torch.Tensor":
    """last_hidden_state, logits, ...: a ModelOutput's (or tuple's) first tensor."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"the model returned no tensor ({type(output).__name__})")


def _profile_inputs(module: "nn.Module", config: Mapping[str, Any], names: Sequence[str],
                    input_shape: tuple[int, ...] | None) -> tuple[list[TensorSpec], int | None]:
    """Static int64 inputs of batch 1 for counting MACs, and the sequence length they use.

    `--input-shape` gives (batch, sequence) or just the sequence; the default is
    DEFAULT_SEQUENCE, cut to the model's position table.
    """
    if not names:
        return [], None
    limit = config.get("max_position_embeddings")
    sequence = DEFAULT_SEQUENCE
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        sequence = min(sequence, limit)
    if input_shape:
        sequence = int(input_shape[-1])
    return [TensorSpec(name, (1, sequence), "int64") for name in names], sequence
