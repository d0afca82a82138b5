"""ONNX graphs, run by ONNX Runtime. Weights are initializers or Constant-node tensors, in the
main graph or in any subgraph (If branches, Loop and Scan bodies), keyed as
:func:`engine.formats.onnx_format.weight_sites` keys them.

Replacing weights writes a new proto (the loaded one is never edited): each replaced tensor's
initializer or Constant value is swapped for the new array at the same place in a copy, so a
weight inside an If branch changes in that branch. External-data files are read when the copy
is made, so the copy is self-contained.

Low-rank factorization is a graph rewrite (:func:`factorize`): a MatMul or Gemm weight
``W[k, n]`` becomes two initializers ``A[k, r]`` and ``B[r, n]`` used by two products in a row.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engine.backends.base import (
    BIAS_CORRECTION,
    LAYER_STATISTICS,
    FX_TRACE,
    GRADIENTS,
    GRAPH_SURGERY,
    LOW_RANK,
    ONNX_EXPORT,
    RUN,
    TORCH_MODULE,
    TRAIN,
    Backend,
    check_replacement,
)
from engine.errors import SlimscopeError
from engine.evaluate import ONNX_IN_MEMORY_LIMIT
from engine.formats.guard import quote
from engine.formats.onnx_format import (
    Dequantization,
    GraphStep,
    WeightSite,
    dequantizations,
    graph_at,
    weight_sites,
)
from engine.onnx_tools import taken_names, unique_name

if TYPE_CHECKING:
    from engine.evaluate import Runner
    from engine.plan import LowRank


_NO_TORCH = ("an ONNX file has no PyTorch module; {what} needs one (a .pt with --trust, "
             "TorchScript or torch.export file of the same model)")


class OnnxBackend(Backend):
    name: ClassVar[str] = "onnx"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {RUN, ONNX_EXPORT, LOW_RANK, LAYER_STATISTICS})
    reasons: ClassVar[Mapping[str, str]] = {
        BIAS_CORRECTION: "bias correction is built for PyTorch modules only (a .pt with --trust "
                         "of the same model); GPTQ and OBS work on this ONNX file",
        GRADIENTS: "ONNX Runtime computes no gradients; the fast sensitivity estimate uses "
                   "layer-input statistics instead, and gradient pruning needs a PyTorch module",
        TRAIN: _NO_TORCH.format(what="fine-tuning"),
        GRAPH_SURGERY: _NO_TORCH.format(what="structured channel pruning"),
        FX_TRACE: _NO_TORCH.format(what="the torch.fx fast path"),
        TORCH_MODULE: _NO_TORCH.format(what="this"),
    }

    def __init__(self, proto: onnx.ModelProto, path: Path, external_folder: Path | None = None,
                 read: Callable[[str], np.ndarray] | None = None) -> None:
        #: The graph as loaded: external data still refers to files in `external_folder`.
        self.proto = proto
        self.path = path
        self.external_folder = external_folder
        #: The loader's validated (memory-mapping) reader; None for a backend this one made.
        self._read = read
        self._sites: dict[str, WeightSite] | None = None
        self._decoders: dict[str, Dequantization] | None = None

    @property
    def sites(self) -> dict[str, WeightSite]:
        """Every constant tensor of the graph by weight key (computed once)."""
        if self._sites is None:
            self._sites = weight_sites(self.proto)
        return self._sites

    @property
    def decoders(self) -> dict[str, Dequantization]:
        """Weights stored as integer codes (QDQ / QLinear graphs) -> how they decode; such a
        weight is read as its float value and written back as codes on the same scale."""
        if self._decoders is None:
            self._decoders = dequantizations(self.proto)
        return self._decoders

    def _stored(self, key: str) -> np.ndarray:
        tensor = self._site(key).tensor
        return numpy_helper.to_array(tensor, str(self.external_folder or self.path.parent))

    def _site(self, key: str) -> WeightSite:
        site = self.sites.get(key)
        if site is None:
            raise SlimscopeError(f"the graph has no tensor named {quote(key)}")
        return site

    def read(self, key: str) -> np.ndarray:
        """The tensor under `key`; a quantized weight as the float weight its codes decode to
        (the loader's store does the same), so every reader sees one value."""
        if self._read is not None:
            return self._read(key)
        decoder = self.decoders.get(key)
        if decoder is None:
            return self._stored(key)
        zero_point = self._stored(decoder.zero_point) if decoder.zero_point else None
        return decoder.decode(self._stored(key), self._stored(decoder.scale), zero_point)

    def full_proto(self) -> onnx.ModelProto:
        """A copy with every external tensor read in, for ONNX Runtime and for saving whole."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        if self.external_folder is not None:
            onnx.load_external_data_for_model(proto, str(self.external_folder))
        return proto

    def with_weights(self, replacements: Mapping[str, np.ndarray]) -> OnnxBackend:
        for key, value in replacements.items():  # refuse before copying a large proto
            check_replacement(key, value, tuple(self._site(key).tensor.dims))
        proto = self.full_proto()
        sites = weight_sites(proto)
        for key, value in replacements.items():
            target = sites[key].tensor
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(target.data_type))
            value = np.asarray(value)
            decoder = self.decoders.get(key)
            if decoder is not None and value.dtype.kind == "f":  # a float weight: back to codes
                zero_point = (numpy_helper.to_array(sites[decoder.zero_point].tensor)
                              if decoder.zero_point else None)
                value = decoder.encode(value, numpy_helper.to_array(sites[decoder.scale].tensor),
                                       zero_point, dtype)
            target.CopyFrom(numpy_helper.from_array(value.astype(dtype), target.name))
        return OnnxBackend(proto, self.path)

    def factorize(self, settings: Mapping[str, "LowRank"]
                  ) -> tuple[OnnxBackend, dict[str, tuple[int, tuple[str, ...]]]]:
        """A copy with the given MatMul/Gemm weights split in two by truncated SVD; per weight
        key actually split, the rank and the keys of the two factors. A weight whose factors
        would not be smaller stays whole and is left out of the answer."""
        proto = self.full_proto()
        done: dict[str, tuple[int, tuple[str, ...]]] = {}
        for key, setting in settings.items():
            weight = self.read(key)
            if weight.ndim != 2:
                raise SlimscopeError(f"{quote(key)}: low-rank needs a 2-D MatMul/Gemm weight, "
                                     f"not shape {list(weight.shape)}")
            rank = rank_for(weight, setting)
            rows, columns = weight.shape
            if rank * (rows + columns) >= rows * columns:
                continue
            proto, factor_keys = factorize_with_keys(proto, key, rank)
            done[key] = (rank, factor_keys)
        return OnnxBackend(proto, self.path), done

    def why_not_factorize(self, key: str) -> str | None:
        """None when :meth:`factorize` can rewrite the weight under `key`, else one line why
        not (a Conv weight, a weight some other operator also reads), for a plan check that
        refuses before any work."""
        site = self._site(key)
        if len(site.tensor.dims) != 2:
            return (f"low-rank is built for 2-D MatMul/Gemm weights in ONNX graphs, and "
                    f"{quote(key)} has shape {list(site.tensor.dims)}")
        try:
            users = _users(self.proto, site)
            _gemm_trans_b(users, self.proto)
        except SlimscopeError as exc:
            return str(exc)
        return None if users else f"{quote(key)}: no MatMul or Gemm uses this weight"

    def runner(self, threads: int | None = None) -> "Runner":
        from engine.evaluate import OnnxRunner

        if self.external_folder is None:
            return OnnxRunner(self.proto, threads)
        return OnnxRunner(self.full_proto(), threads)

    def save(self, path: Path) -> None:
        proto = self.full_proto()
        # protobuf cannot serialize a message over 2 GiB: larger weights go beside the file
        large = proto.ByteSize() > ONNX_IN_MEMORY_LIMIT
        onnx.save_model(proto, str(path), save_as_external_data=large,
                        location=f"{Path(path).name}.data")


# -- low rank -------------------------------------------------------------------------------
def rank_for(weight: np.ndarray, setting: "LowRank") -> int:
    """The plan's fixed rank, or the smallest rank keeping its fraction of the energy."""
    singular = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    if setting.rank is not None:
        return min(setting.rank, len(singular))
    power = np.cumsum(singular ** 2)
    kept = power / power[-1] if power[-1] > 0 else np.ones_like(power)
    energy = float(setting.energy if setting.energy is not None else 1.0)
    return min(int(np.searchsorted(kept, energy - 1e-12)) + 1, len(singular))


def svd_factors(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A[k, r], B[r, n]) with A @ B the best rank-r approximation of W[k, n]; the singular
    values are split evenly, so both factors have similar ranges (kinder to quantization)."""
    u, s, vh = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return ((u[:, :rank] * root).astype(weight.dtype),
            (root[:, None] * vh[:rank]).astype(weight.dtype))


def factorize(proto: onnx.ModelProto, weight_key: str, rank: int) -> onnx.ModelProto:
    """A copy of `proto` whose weight `weight_key` is replaced by two rank-`rank` factors.

    Every node using the weight must be a MatMul taking it as its second input or a Gemm
    taking it as B (either transB); ``X @ W`` becomes ``(X @ A) @ B``, a Gemm becomes a MatMul
    (a Gemm with transA) followed by a Gemm holding the bias, alpha and beta. The weight's
    graph may be a subgraph, and its users may sit in subgraphs nested below it.
    """
    return factorize_with_keys(proto, weight_key, rank)[0]


def factorize_with_keys(proto: onnx.ModelProto, weight_key: str, rank: int
                        ) -> tuple[onnx.ModelProto, tuple[str, str]]:
    """:func:`factorize`, also answering the weight keys of the two factors."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    site = weight_sites(copy).get(weight_key)
    if site is None:
        raise SlimscopeError(f"the graph has no tensor named {quote(weight_key)}")
    weight = numpy_helper.to_array(site.tensor)
    if weight.ndim != 2 or weight.dtype.kind != "f":
        raise SlimscopeError(f"{quote(weight_key)}: low-rank needs a 2-D float weight, not "
                             f"{weight.dtype.name} of shape {list(weight.shape)}")
    users = _users(copy, site)
    if not users:
        raise SlimscopeError(f"{quote(weight_key)}: no MatMul or Gemm uses this weight")
    transposed = _gemm_trans_b(users, copy)  # Gemm(transB=1) stores W as [n, k]
    taken = taken_names(copy.graph)
    first_name = unique_name(f"{site.name}.lowrank_first", taken)
    second_name = unique_name(f"{site.name}.lowrank_second", taken)
    first, second = svd_factors(weight.T if transposed else weight, min(rank, *weight.shape))
    for graph_path, node_indices in sorted(users.items(), key=lambda item: -len(item[0])):
        graph = graph_at(copy, graph_path)  # deepest first: outer node indices stay valid
        for index in sorted(node_indices, reverse=True):  # later first: indices stay valid
            _split_node(graph, index, first_name, second_name, taken)
    home = graph_at(copy, site.graph_path)
    _remove_weight(home, site)
    home.initializer.append(numpy_helper.from_array(
        np.ascontiguousarray(first.T) if transposed else first, first_name))
    home.initializer.append(numpy_helper.from_array(
        np.ascontiguousarray(second.T) if transposed else second, second_name))
    keys = {s.name: key for key, s in weight_sites(copy).items()
            if s.graph_path == site.graph_path}
    return copy, (keys[first_name], keys[second_name])


def _users(proto: onnx.ModelProto, site: WeightSite) -> dict[tuple[GraphStep, ...], list[int]]:
    """Per graph, the indices of the nodes that read the weight; refuses a user that is not a
    MatMul (weight second) or a Gemm (weight as B), since only those are rewritten."""
    found: dict[tuple[GraphStep, ...], list[int]] = {}

    def visit(graph: onnx.GraphProto, graph_path: tuple[GraphStep, ...], top: bool) -> None:
        if not top and _declares(graph, site.name):
            return  # shadowed: this subgraph's value of that name is another one
        for index, node in enumerate(graph.node):
            if site.name in node.input:
                positions = [i for i, name in enumerate(node.input) if name == site.name]
                if node.op_type not in ("MatMul", "Gemm") or positions != [1]:
                    raise SlimscopeError(
                        f"{quote(site.name)}: low-rank rewrites MatMul and Gemm weights only, "
                        f"but node {quote(node.name or node.op_type)} ({node.op_type}) uses it")
                found.setdefault(graph_path, []).append(index)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g, (*graph_path, (index, attribute.name, -1)), False)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for position, graph_ in enumerate(attribute.graphs):
                        visit(graph_, (*graph_path, (index, attribute.name, position)), False)

    visit(graph_at(proto, site.graph_path), site.graph_path, True)
    return found


def _gemm_trans_b(users: dict[tuple[GraphStep, ...], list[int]], proto: onnx.ModelProto) -> bool:
    """Whether the factors are stored transposed: all users are Gemms with transB=1. Users
    that disagree (a MatMul and a transB Gemm sharing the weight) are refused."""
    flags = set()
    for graph_path, indices in users.items():
        graph = graph_at(proto, graph_path)
        for index in indices:
            node = graph.node[index]
            flags.add(bool(node.op_type == "Gemm" and _attribute(node, "transB", 0)))
    if len(flags) > 1:
        raise SlimscopeError("low-rank: the weight is used both transposed and not; "
                             "factorize each use separately")
    return flags == {True}


def _declares(graph: onnx.GraphProto, name: str) -> bool:
    return (any(value.name == name for value in graph.input)
            or any(tensor.name == name for tensor in graph.initializer)
            or any(name in node.output for node in graph.node))


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _split_node(graph: onnx.GraphProto, index: int, first_name: str, second_name: str,
                taken: set[str]) -> None:
    """Replace node `index` (x @ W, or Gemm(x, W, C)) by two nodes through the factors."""
    node = graph.node[index]
    base = node.name or f"{node.op_type}_{index}"
    middle = unique_name(f"{node.output[0]}.lowrank", taken)
    if node.op_type == "MatMul":
        first = helper.make_node("MatMul", [node.input[0], first_name], [middle],
                                 name=f"{base}.lowrank_first")
        second = helper.make_node("MatMul", [middle, second_name], list(node.output),
                                  name=f"{base}.lowrank_second")
    else:
        trans_a, trans_b = _attribute(node, "transA", 0), _attribute(node, "transB", 0)
        if trans_a:
            first = helper.make_node("Gemm", [node.input[0], first_name], [middle],
                                     name=f"{base}.lowrank_first", transA=1, transB=trans_b)
        elif trans_b:
            first = helper.make_node("Gemm", [node.input[0], first_name], [middle],
                                     name=f"{base}.lowrank_first", transB=1)
        else:
            first = helper.make_node("MatMul", [node.input[0], first_name], [middle],
                                     name=f"{base}.lowrank_first")
        kept = {a.name: a for a in node.attribute if a.name in ("alpha", "beta")}
        second = helper.make_node("Gemm", [middle, second_name, *node.input[2:]],
                                  list(node.output), name=f"{base}.lowrank_second",
                                  transB=trans_b)
        second.attribute.extend(kept.values())
    del graph.node[index]
    graph.node.insert(index, second)
    graph.node.insert(index, first)


def _remove_weight(graph: onnx.GraphProto, site: WeightSite) -> None:
    """Drop the factorized weight's initializer or Constant node (found by name: the splits
    moved node indices)."""
    if site.initializer is not None:
        index = next(i for i, tensor in enumerate(graph.initializer) if tensor.name == site.name)
        del graph.initializer[index]
    else:
        index = next(i for i, node in enumerate(graph.node)
                     if node.op_type == "Constant" and list(node.output) == [site.name])
        del graph.node[index]


