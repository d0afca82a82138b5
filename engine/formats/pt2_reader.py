"""Reading a torch.export ``.pt2`` archive without running anything the archive brings along.

``torch.export.load`` unpickles whatever member a payload config names (``use_pickle``, custom
and opaque objects, sample inputs as a fallback), imports modules named in tree specs, feeds
symbolic expressions to ``sympy.sympify`` (which is ``eval``), ``exec``s the archive's guard code,
and pastes node names, attribute paths and stack traces into the Python source FX generates. So a
viewer reads the archive itself:

* the zip is checked first (duplicate members, bombs: :func:`guard.check_zip`);
* each tensor is built from its raw member bytes (memory-mapped when stored uncompressed) after
  checking dtype, shape, strides and size against the member;
* a pickled tensor is read with the weights-only unpickler, which calls nothing; objects that
  need more (custom or opaque objects, real pickles) need the user's trust;
* the JSON program is checked before torch's JSON deserializer sees it: operators must be
  registered PyTorch operators, expressions plain arithmetic on shape symbols, names plain
  identifiers, tree specs built-in containers; debugging text that FX would paste into code is
  dropped, guard code is dropped, and sample inputs are not read.

What passes is an ordinary runnable ``ExportedProgram``.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import FormatError, UntrustedPickleError, one_line
from engine.formats import guard
from engine.formats._torch_common import (
    is_weights_only_refusal,
    quiet_torch,
    referenced_globals,
    untrusted_pickle_error,
)

MODEL_NAME = "model"
#: Namespaces of registered operators a graph may call without trust.
_OPERATOR_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed"})
#: Registered operators that reach outside the tensors they are given.
_DENIED_OPERATORS = frozenset({"aten::from_file"})
#: Higher-order operators that only run subgraphs of the same, checked kind.
_HIGHER_ORDER_OPERATORS = frozenset({
    "cond", "while_loop", "map_impl", "scan", "wrap_with_set_grad_enabled",
    "wrap_with_autocast", "auto_functionalized", "auto_functionalized_v2", "invoke_subgraph",
})
#: Container types a tree spec may name; others import modules or call factories.
_TREE_TYPES = frozenset({
    None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
    "collections.namedtuple", "torch.fx.immutable_collections.immutable_list",
    "torch.fx.immutable_collections.immutable_dict",
})
#: Names a shape expression may use besides shape symbols (s0, u3, ...): sympy's printed forms.
_EXPRESSION_NAMES = frozenset({
    "Max", "Min", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Mod", "floor",
    "ceiling", "Abs", "True", "False", "oo", "int_oo", "FloorDiv", "ModularIndexing", "Where",
    "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "IntTrueDiv",
    "FloatTrueDiv", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity", "IsNonOverlappingAndDenseIndicator",
})
_SYMBOL = re.compile(r"[a-z]+_?\d+")
#: How torch writes a dynamic dimension's symbol with its assumptions: Symbol('s31',
#: positive=True, integer=True). The only quoted text a shape expression may hold.
_SYMBOL_CALL = re.compile(r"Symbol\('([a-z]+_?\d+)'(?:,\s*[a-z]+=(?:True|False))*\)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPRESSION_CHARS = re.compile(r"[A-Za-z0-9_ +\-*/%(),.<>=&|~]*")
_NUMBER = re.compile(r"\d+(\.\d+)?(e[+-]?\d+)?")
_SMALL_POWER = re.compile(r"\*\*\s*\d{1,2}(?!\d)")
_NAME_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_QUOTES = re.compile(r"[\"'\\]")
#: JSON keys whose strings are names FX writes into generated source.
_NAME_KEYS = frozenset({"name", "as_name", "parameter_name", "buffer_name",
                        "tensor_constant_name", "custom_obj_name", "fqn", "arg_name"})
#: Node metadata worth keeping: where each call came from, for layer names and kinds.
_KEPT_METADATA = ("nn_module_stack",)
_MAX_EXPRESSION = 400
_MAX_NUMBER_DIGITS = 20
_MAX_POWERS = 2
_LOCAL_HEADER = struct.Struct("<4s22xHH")


class _NeedsTrust(Exception):
    """What in the archive only a trusted load may follow; turned into one refusal line."""


def read_program(path: Path) -> torch.export.ExportedProgram:
    """The archive's runnable program, built without unpickling or evaluating its contents."""
    name = path.name
    size = guard.regular_file(path).st_size
    with zipfile.ZipFile(path) as archive:
        guard.check_zip(archive, size, name)
        try:
            reader = _ArchiveReader(path, archive, size)
            document = reader.json(f"models/{MODEL_NAME}.json")
            state_dict = reader.payloads("data/weights", f"{MODEL_NAME}_weights_config.json")
            constants = reader.payloads("data/constants",
                                        f"{MODEL_NAME}_constants_config.json")
            _check_program(document)
        except _NeedsTrust as reason:
            raise UntrustedPickleError(
                f"{name} holds {reason}, which can run code when loaded; open it only if you "
                "trust its source: pass --trust on the command line or confirm in the app"
            ) from None
    return _deserialize(name, document, state_dict, constants)


# -- the archive --------------------------------------------------------------------------------
class _ArchiveReader:
    """Members of one archive under its root folder, and tensors built from them."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, size: int) -> None:
        self.path, self.archive, self.size, self.name = path, archive, size, path.name
        roots = [member.rpartition("/")[0] for member in archive.namelist()
                 if member.rpartition("/")[2] == "archive_format"]
        if len(roots) != 1:
            if any(member.endswith("serialized_exported_program.json")
                   for member in archive.namelist()):
                raise _NeedsTrust("a torch.export archive in the old (before torch 2.6) layout, "
                                  "whose weights are pickles")
            raise FormatError(f"{guard.quote(self.name)}: not one torch.export archive "
                              f"({len(roots)} archive_format members)")
        self.root = f"{roots[0]}/" if roots[0] else ""
        byteorder = self._text("byteorder", "little")
        if byteorder != "little":
            raise FormatError(f"{guard.quote(self.name)}: byte order {guard.quote(byteorder)} "
                              "is not supported")
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _text(self, member: str, default: str) -> str:
        full = self.root + member
        if full not in self.archive.NameToInfo:
            return default
        return guard.read_member(self.archive, full, self.name, limit=64).decode(
            "ascii", "replace").strip()

    def json(self, member: str) -> Any:
        try:
            return json.loads(guard.read_member(self.archive, self.root + member, self.name))
        except (ValueError, RecursionError):
            raise FormatError(f"{guard.quote(self.name)}: member {guard.quote(member)} is not "
                              "valid JSON") from None

    def payloads(self, folder: str, config_member: str) -> dict[str, torch.Tensor]:
        """Every tensor a payload config lists, keyed by its dotted name."""
        config = self.json(f"{folder}/{config_member}")
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise FormatError(f"{guard.quote(self.name)}: {guard.quote(config_member)} has no "
                              "'config' table")
        tensors: dict[str, torch.Tensor] = {}
        for fqn, entry in entries.items():
            where = f"{guard.quote(self.name)}: tensor {guard.quote(fqn)}"
            if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
                raise FormatError(f"{where}: its entry has no member name")
            _check_name_path(fqn)
            member = entry["path_name"]
            if "/" in member or member in ("", ".", ".."):
                raise FormatError(f"{where}: member name {guard.quote(member)} is not a plain "
                                  "file name")
            if member.startswith(("custom_obj_", "opaque_obj_")):
                raise _NeedsTrust(f"a pickled Python object ({guard.quote(member)})")
            full = f"{self.root}{folder}/{member}"
            if entry.get("use_pickle") is True:
                tensor = self._pickled(full, where)
            elif entry.get("use_pickle") in (False, None):
                tensor = self._raw(full, entry.get("tensor_meta"), where)
            else:
                raise FormatError(f"{where}: use_pickle is {guard.quote(entry['use_pickle'])}")
            if entry.get("is_param") is True and tensor.is_floating_point():
                meta = entry.get("tensor_meta")
                wants_grad = isinstance(meta, dict) and meta.get("requires_grad") is True
                tensor = torch.nn.Parameter(tensor, requires_grad=wants_grad)
            tensors[fqn] = tensor
        return tensors

    def _pickled(self, member: str, where: str) -> torch.Tensor:
        """A torch.save'd tensor, read by the weights-only unpickler from bytes we read."""
        data = guard.read_member(self.archive, member, self.name)
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                guard.check_zip(inner, len(data), f"{self.name}:{member}")
        try:
            with quiet_torch():
                tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if is_weights_only_refusal(exc):
                raise untrusted_pickle_error(self.name, referenced_globals(io.BytesIO(data))
                                             ) from None
            raise FormatError(f"{where}: its pickle cannot be read ({one_line(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - a broken payload is a format error
            raise FormatError(f"{where}: its pickle cannot be read ({one_line(exc)})") from None
        if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
            raise FormatError(f"{where}: its pickle holds a {type(tensor).__name__}, not a tensor")
        return tensor.detach()

    def _raw(self, member: str, meta: Any, where: str) -> torch.Tensor:
        """A view of the member's bytes with the shape, strides and offset its meta states."""
        if not isinstance(meta, dict):
            raise FormatError(f"{where}: no tensor description")
        dtype = _torch_dtype(meta.get("dtype"), where)
        sizes = [_concrete(value, where) for value in _list(meta.get("sizes"), where)]
        strides = [_concrete(value, where) for value in _list(meta.get("strides"), where)]
        offset = _concrete(meta.get("storage_offset", {"as_int": 0}), where)
        count = guard.element_count(where, sizes)
        if len(strides) != len(sizes) or min(strides, default=0) < 0 or offset < 0:
            raise FormatError(f"{where}: strides {guard.quote(strides)} or offset {offset} do "
                              f"not fit shape {guard.quote(sizes)}")
        flat = self._flat_tensor(member, dtype, where)
        extent = 0 if count == 0 else offset + 1 + sum((s - 1) * st for s, st in zip(sizes, strides))
        if extent > flat.numel():
            raise FormatError(f"{where}: shape {guard.quote(sizes)} needs {extent} elements "
                              f"but its member holds {flat.numel()}")
        return torch.as_strided(flat, sizes, strides, offset)

    def _flat_tensor(self, member: str, dtype: torch.dtype, where: str) -> torch.Tensor:
        key = (member, dtype)
        if key not in self._flat:
            try:
                info = self.archive.getinfo(member)
            except KeyError:
                raise FormatError(f"{where}: the archive has no member {guard.quote(member)}"
                                  ) from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if info.file_size % itemsize:
                raise FormatError(f"{where}: its member's {info.file_size} bytes are not a "
                                  f"whole number of {dtype} elements")
            self._flat[key] = self._member_bytes(info).view(dtype)
        return self._flat[key]

    def _member_bytes(self, info: zipfile.ZipInfo) -> torch.Tensor:
        """The member as a uint8 tensor: memory-mapped when stored, else read and inflated."""
        if info.file_size == 0:
            return torch.empty(0, dtype=torch.uint8)
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            start = self._data_offset(info)
            mapped = np.memmap(self.path, dtype=np.uint8, mode="c", offset=start,
                               shape=(info.file_size,))
            return torch.from_numpy(mapped)
        data = bytearray(guard.read_member(self.archive, info.filename, self.name))
        return torch.frombuffer(data, dtype=torch.uint8)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes begin: after its local header, name and extra field."""
        fp = self.archive.fp
        assert fp is not None
        fp.seek(info.header_offset)
        header = fp.read(_LOCAL_HEADER.size)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header) if len(
            header) == _LOCAL_HEADER.size else (b"", 0, 0)
        if signature != b"PK\x03\x04":
            raise FormatError(f"{guard.quote(self.name)}: member {guard.quote(info.filename)} "
                              "has a damaged header")
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        guard.span_inside(f"{guard.quote(self.name)}: member {guard.quote(info.filename)}",
                          start, info.file_size, self.size)
        return start


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise FormatError(f"{where}: sizes and strides must be lists")
    return value


def _concrete(value: Any, where: str) -> int:
    """A stored tensor's dimension: {"as_int": n}; symbolic sizes have no bytes behind them."""
    number = value.get("as_int") if isinstance(value, dict) else None
    if isinstance(number, bool) or not isinstance(number, int):
        raise FormatError(f"{where}: dimension {guard.quote(value)} is not a fixed integer")
    return number


def _torch_dtype(code: Any, where: str) -> torch.dtype:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(code) if isinstance(code, int) else None
    if dtype is None or dtype.is_complex:
        raise FormatError(f"{where}: dtype code {guard.quote(code)} is not a numeric type")
    return dtype


def _check_name_path(text: str) -> None:
    if not _NAME_PATH.fullmatch(text):
        raise _NeedsTrust(f"a name ({guard.quote(text)}) that is not a plain dotted path")


# -- the JSON program ---------------------------------------------------------------------------
def _check_program(document: Any) -> None:
    """Refuse what would make torch's deserializer or FX run code; drop what it need not see.

    Changes `document` in place: node metadata keeps only the module stack; guards and
    free-form annotations are dropped.
    """
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        raise FormatError("the archive's program description is not a JSON object")
    document["guards_code"] = []
    document["graph_module"]["metadata"] = {}
    stack: list[tuple[str | None, Any]] = [(None, document)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            if "target" in value and "inputs" in value:
                _check_operator(value["target"])
                if isinstance(value.get("metadata"), dict):
                    value["metadata"] = {k: v for k, v in value["metadata"].items()
                                         if k in _KEPT_METADATA}
            for inner_key, inner in value.items():
                if not isinstance(inner_key, str) or _CONTROL.search(inner_key) or (
                        _QUOTES.search(inner_key)):
                    raise _NeedsTrust(f"a key {guard.quote(inner_key)} with quotes or control "
                                      "characters")
                stack.append((inner_key, inner))
        elif isinstance(value, list):
            stack.extend((key, inner) for inner in value)
        elif isinstance(value, str):
            _check_string(key, value)


def _check_string(key: str | None, text: str) -> None:
    if key in ("as_string", "as_strings", "torch_version"):
        return  # data, repr'd wherever code is generated
    if key == "as_operator":
        _check_operator(text)
    elif key == "expr_str":
        _check_expression(text)
    elif key in ("in_spec", "out_spec"):
        _check_tree_spec(text)
    elif key in _NAME_KEYS:
        if text and not _NAME_PATH.fullmatch(text):
            raise _NeedsTrust(f"a name ({guard.quote(text)}) that is not a plain identifier")
    elif _CONTROL.search(text) or (key not in _KEPT_METADATA and _QUOTES.search(text)):
        raise _NeedsTrust(f"text ({guard.quote(text)}) with quotes or control characters")


def _check_operator(target: Any) -> None:
    """Only registered operators of known namespaces, checked higher-order ops, and sym ops."""
    from torch._export.serde.serialize import _SYM_OPS

    if isinstance(target, str) and target.startswith("torch.ops.") and _NAME_PATH.fullmatch(
            target):
        resolved: Any = torch.ops
        for part in target.split(".")[2:]:
            try:
                resolved = getattr(resolved, part)
            except (AttributeError, RuntimeError):
                resolved = None
                break
        if isinstance(resolved, torch._ops.OpOverload):
            namespace = resolved.namespace
            if namespace in _OPERATOR_NAMESPACES and resolved.name() not in _DENIED_OPERATORS:
                return
        if isinstance(resolved, torch._ops.HigherOrderOperator) and (
                resolved.name() in _HIGHER_ORDER_OPERATORS):
            return
    sym_ops = {f"{op.__module__}.{op.__name__}" for op in _SYM_OPS}
    if target in sym_ops:
        return
    raise _NeedsTrust(f"a graph that calls {guard.quote(target)}, not a PyTorch operator "
                      "Slimscope runs without trust")


def _check_expression(text: str) -> None:
    """Plain arithmetic on shape symbols: sympy evaluates it with Python's `eval`.

    Besides names and attributes, huge numbers and towers of powers are refused: sympy would
    compute them exactly, for hours.
    """
    text = _SYMBOL_CALL.sub(r"\1", text)
    plain = _NUMBER.sub("0", text)
    names = [word for word in _IDENTIFIER.findall(plain)
             if not (_SYMBOL.fullmatch(word) or word in _EXPRESSION_NAMES)]
    powers = text.count("**")
    if len(text) > _MAX_EXPRESSION or not _EXPRESSION_CHARS.fullmatch(text):
        problem = "characters or length"
    elif any(len(number) > _MAX_NUMBER_DIGITS for number in re.findall(r"[0-9.]+", text)):
        problem = "a long number"
    elif "." in plain or names:
        problem = f"the name {names[0]!r}" if names else "attribute access"
    elif powers > _MAX_POWERS or powers != len(_SMALL_POWER.findall(text)):
        problem = "a large power"
    else:
        return
    raise _NeedsTrust(f"a shape expression ({guard.quote(text)}) with {problem}, not plain "
                      "arithmetic")


def _check_tree_spec(text: str) -> None:
    """Built-in containers only, and no enum contexts (those import modules)."""
    try:
        protocol, spec = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise FormatError(f"tree spec {guard.quote(text)} is not valid") from None
    nodes = [spec]
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict) or node.get("type") not in _TREE_TYPES:
            kind = node.get("type") if isinstance(node, dict) else node
            raise _NeedsTrust(f"an input structure of type {guard.quote(kind)}")
        context = node.get("context")
        try:
            decoded = json.dumps(json.loads(context)) if isinstance(context, str) else ""
        except (ValueError, RecursionError):
            raise FormatError(f"tree spec context {guard.quote(context)} is not valid") from None
        if "__enum__" in decoded:
            raise _NeedsTrust("an input structure naming an enum type")
        children = node.get("children_spec")
        nodes.extend(children if isinstance(children, list) else [None])


def _deserialize(name: str, document: dict[str, Any], state_dict: dict[str, torch.Tensor],
                 constants: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """torch's JSON deserializer on the checked document, with tensors we built ourselves."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        with quiet_torch():
            program = _dict_to_dataclass(schema.ExportedProgram, document)
            # No sample inputs: torch would unpickle them, and they switch on guard code.
            return ExportedProgramDeserializer().deserialize(program, state_dict, constants,
                                                             None)
    except Exception as exc:  # noqa: BLE001 - any failure here is a damaged program
        detail = guard.quote(one_line(exc), 160)
        raise FormatError(f"{guard.quote(name)}: its graph cannot be rebuilt "
                          f"({type(exc).__name__}: {detail})") from None
