"""Zip-based model files (.pt2, .pt, TorchScript, .slim) run nothing and allocate nothing they
should not: each hostile file is a real archive rewritten in the test, each must fail with one
line, and no marker file may appear. Where torch's own loader is fooled by the same file, the
test shows it, so each case is a real attack and not a file that fails for some other reason."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import factories
from engine.bundle import MANIFEST
from engine.compress import compress
from engine.data import ArraySource
from engine.errors import FormatError, ModelLoadError, UntrustedPickleError
from engine.export import export
from engine.formats import LoadOptions, load_model
from engine.formats._torch_common import module_model
from engine.model import TensorSpec
from engine.plan import Plan

Members = list[tuple[str, bytes]]


# -- rewriting real archives --------------------------------------------------------------------
def read_members(path: Path) -> Members:
    with zipfile.ZipFile(path) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def write_members(path: Path, members: Members,
                  compression: dict[str, int] | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": wanted here
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members:
                archive.writestr(name, data, (compression or {}).get(name, zipfile.ZIP_STORED))
    return path


def member(members: Members, suffix: str) -> str:
    return next(name for name, _ in members if name.endswith(suffix))


def replace(members: Members, name: str, data: bytes) -> Members:
    return [(n, data if n == name else d) for n, d in members]


def edit_json(members: Members, suffix: str, change: Callable[[Any], None]) -> Members:
    name = member(members, suffix)
    document = json.loads(dict(members)[name])
    change(document)
    return replace(members, name, json.dumps(document).encode())


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return factories.write_torch_export(tmp_path_factory.mktemp("pt2"))


def torch_save_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(factories.RunsShellCommand(marker), buffer)
    return buffer.getvalue()


# -- the six .pt2 variants from issue 12 ----------------------------------------------------------
def opaque_object_constant(members: Members, marker: Path) -> Members:
    config = member(members, "constants_config.json")
    folder = config.rpartition("/")[0]

    def add(document: Any) -> None:
        document["config"]["evil"] = {"path_name": "opaque_obj_0.json", "is_param": False,
                                      "use_pickle": True, "tensor_meta": None}
    return [*edit_json(members, "constants_config.json", add),
            (f"{folder}/opaque_obj_0.json", pickle.dumps(factories.RunsShellCommand(marker)))]


def pickled_tensor_constant(members: Members, marker: Path) -> Members:
    config = member(members, "constants_config.json")
    folder = config.rpartition("/")[0]

    def add(document: Any) -> None:
        document["config"]["evil"] = {"path_name": "tensor_constant_0.json", "is_param": False,
                                      "use_pickle": True, "tensor_meta": None}
    return [*edit_json(members, "constants_config.json", add),
            (f"{folder}/tensor_constant_0.json", torch_save_payload(marker))]


def pickled_weight_named(leaf: str) -> Callable[[Members, Path], Members]:
    def rewrite(members: Members, marker: Path) -> Members:
        config = member(members, "weights_config.json")
        folder = config.rpartition("/")[0]

        def switch(document: Any) -> None:
            document["config"]["fc.bias"].update(path_name=leaf, use_pickle=True)
        return [*edit_json(members, "weights_config.json", switch),
                (f"{folder}/{leaf}", torch_save_payload(marker))]
    return rewrite


def duplicate_member_evil_first(members: Members, marker: Path) -> Members:
    config = member(members, "weights_config.json")
    folder = config.rpartition("/")[0]
    evil = dict(pickled_weight_named("weight_evil")(members, marker))
    benign = [(name, data) for name, data in members if name != config]
    return [(config, evil[config]), *benign, (f"{folder}/weight_evil", evil[
        f"{folder}/weight_evil"]), (config, dict(members)[config])]


ATTACKS = {
    "opaque-object-constant": opaque_object_constant,
    "pickled-tensor-constant": pickled_tensor_constant,
    "pickled-weight-named-json": pickled_weight_named("weights.json"),
    "pickled-weight-named-version": pickled_weight_named("version"),
    "pickled-weight-named-byteorder": pickled_weight_named("byteorder"),
    "duplicate-member-evil-first": duplicate_member_evil_first,
}


def assert_one_line_refusal(path: Path, error: type[Exception] = ModelLoadError,
                            options: LoadOptions | None = None) -> str:
    with pytest.raises(error) as raised:
        load_model(path, options)
    message = str(raised.value)
    assert "\n" not in message and "\r" not in message and message.strip() == message
    return message


@pytest.mark.parametrize("attack", ATTACKS, ids=str)
def test_pt2_attacks_run_no_code(attack: str, pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = write_members(tmp_path / "evil.pt2", ATTACKS[attack](read_members(pt2), marker))

    assert_one_line_refusal(path)
    assert not marker.exists(), "inspecting the file ran its code"

    # The same file does run code through torch's own loader: the attack is real.
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.load(str(path))
    assert marker.exists()


def test_pt2_pickled_tensor_loads_through_weights_only_unpickler(pt2: Path,
                                                                 tmp_path: Path) -> None:
    """A weight torch pickled (as it does for tensor subclasses) is read without trust when
    the weights-only unpickler can read it."""
    def pickle_bias(members: Members) -> Members:
        config = member(members, "weights_config.json")
        buffer = io.BytesIO()
        torch.save(torch.arange(10, dtype=torch.float32), buffer)

        def switch(document: Any) -> None:
            document["config"]["fc.bias"].update(path_name="pickled_0", use_pickle=True)
        return [*edit_json(members, "weights_config.json", switch),
                (f"{config.rpartition('/')[0]}/pickled_0", buffer.getvalue())]

    path = write_members(tmp_path / "pickled.pt2", pickle_bias(read_members(pt2)))
    model = load_model(path)
    assert torch.equal(model.module.get_parameter("fc.bias").detach(), torch.arange(10.0))


# -- what torch's JSON deserializer and FX would turn into code ----------------------------------
def graph_edit(change: Callable[[dict[str, Any], Path], None]
               ) -> Callable[[Members, Path], Members]:
    return lambda members, marker: edit_json(members, "models/model.json",
                                             lambda document: change(document, marker))


def shell(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def call_shell_from_graph(document: dict[str, Any], marker: Path) -> None:
    node = document["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.os.system"


def expression_runs_shell(document: dict[str, Any], marker: Path) -> None:
    values = document["graph_module"]["graph"]["tensor_values"]
    first = next(iter(values.values()))
    first["sizes"][0] = {"as_expr": {"expr_str": shell(marker), "hint": {"as_int": 1}}}


def placeholder_name_injects_code(document: dict[str, Any], marker: Path) -> None:
    graph = document["graph_module"]["graph"]
    graph["inputs"][-1]["as_tensor"]["name"] = f"x=({shell(marker)})"


def tree_spec_imports_module(document: dict[str, Any], marker: Path) -> None:
    signature = document["graph_module"]["module_call_graph"][0]["signature"]
    spec = json.loads(signature["in_spec"])
    spec[1]["children_spec"][1] = {
        "type": "collections.defaultdict", "children_spec": [],
        "context": json.dumps({"default_factory_module": "antigravity",
                               "default_factory_name": "geohash", "dict_context": []})}
    signature["in_spec"] = json.dumps(spec)


HOSTILE_GRAPHS = {
    "node-calls-non-operator": call_shell_from_graph,
    "shape-expression-evaluates-code": expression_runs_shell,
    "node-name-injects-code": placeholder_name_injects_code,
    "tree-spec-imports-module": tree_spec_imports_module,
}


@pytest.mark.parametrize("case", HOSTILE_GRAPHS, ids=str)
def test_pt2_graph_that_would_run_code_needs_trust(case: str, pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    rewrite = graph_edit(HOSTILE_GRAPHS[case])
    path = write_members(tmp_path / "evil.pt2", rewrite(read_members(pt2), marker))

    message = assert_one_line_refusal(path, UntrustedPickleError,
                                      LoadOptions(input_shape=factories.TINY_CNN_INPUT))
    assert "--trust" in message
    assert not marker.exists()


def test_pt2_debug_text_and_guards_never_become_code(pt2: Path, tmp_path: Path) -> None:
    """Stack traces are pasted into FX's generated source, guards are exec'd: both are dropped,
    so the program still loads and runs, and nothing else does."""
    marker = tmp_path / "code-ran"

    def plant(document: dict[str, Any], marker: Path) -> None:
        document["guards_code"] = [f"{shell(marker)} or True"]
        for node in document["graph_module"]["graph"]["nodes"]:
            node["metadata"]["stack_trace"] = (f'File "x.py", line 1, in f\n    y\r{shell(marker)}'
                                               "\nz")

    path = write_members(tmp_path / "planted.pt2", graph_edit(plant)(read_members(pt2), marker))
    model = load_model(path, LoadOptions(input_shape=factories.TINY_CNN_INPUT))
    model.module(torch.zeros(factories.TINY_CNN_INPUT))
    assert model.outputs and not marker.exists()


# -- shapes, sizes and bombs ----------------------------------------------------------------------
def test_pt2_zip_bomb_member_is_refused(pt2: Path, tmp_path: Path) -> None:
    members = read_members(pt2)
    bomb = f"{members[0][0].partition('/')[0]}/extra/bomb"
    path = write_members(tmp_path / "bomb.pt2", [*members, (bomb, bytes(64 << 20))],
                         {bomb: zipfile.ZIP_DEFLATED})
    assert "zip bomb" in assert_one_line_refusal(path, FormatError)


@pytest.mark.parametrize("sizes, fragment", [
    ([{"as_int": 50000}, {"as_int": 50000}], "needs"),
    ([{"as_int": -4}, {"as_int": 4}], "negative"),
    ([{"as_expr": {"expr_str": "s0"}}], "not a fixed integer"),
], ids=["larger-than-member", "negative", "symbolic"])
def test_pt2_weight_shapes_must_fit_their_bytes(sizes: list, fragment: str, pt2: Path,
                                                tmp_path: Path) -> None:
    def resize(document: Any) -> None:
        meta = document["config"]["fc.weight"]["tensor_meta"]
        meta.update(sizes=sizes, strides=[{"as_int": 1}] * len(sizes))

    members = edit_json(read_members(pt2), "weights_config.json", resize)
    path = write_members(tmp_path / "shape.pt2", members)
    assert fragment in assert_one_line_refusal(path, FormatError)


def test_pt2_loads_without_trust_runnable_and_weights_memory_mapped(pt2: Path) -> None:
    model = load_model(pt2, LoadOptions(input_shape=factories.TINY_CNN_INPUT))
    program = torch.export.load(str(pt2))
    x = torch.randn(factories.TINY_CNN_INPUT)
    assert torch.equal(model.module(x), program.module()(x))
    assert [layer.kind for layer in model.layers] == ["Conv2d", "BatchNorm2d", "Linear"]
    assert str(pt2) in Path("/proc/self/maps").read_text()  # stored members are mapped, not read


def test_pt2_with_a_dynamic_batch_loads_without_trust(tmp_path: Path) -> None:
    """Dynamic dimensions are written as Symbol('s31', positive=True, integer=True)."""
    module = torch.nn.Sequential(torch.nn.Linear(6, 3)).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (torch.randn(2, 6),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "dynamic.pt2"))
    model = load_model(tmp_path / "dynamic.pt2")
    assert isinstance(model.inputs[0].shape[0], str)
    x = torch.randn(5, 6)
    assert torch.allclose(model.module(x), module(x))


def test_pt_zip_bomb_data_pkl_is_refused(tmp_path: Path) -> None:
    source = factories.write_state_dict(tmp_path)
    members = read_members(source)
    data_pkl = member(members, "data.pkl")
    path = write_members(tmp_path / "bomb.pt", replace(members, data_pkl, bytes(64 << 20)),
                         {data_pkl: zipfile.ZIP_DEFLATED})
    assert "zip bomb" in assert_one_line_refusal(path, FormatError)


def test_pt_protocol_5_refusal_is_the_only_output(tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """torch's weights-only unpickler cannot read protocol 4/5 and warns in two lines first."""
    path = tmp_path / "protocol5.pt"
    torch.save(factories.tiny_cnn().state_dict(), path, pickle_protocol=5)
    assert_one_line_refusal(path, UntrustedPickleError)
    assert capfd.readouterr().err == ""


def test_torchscript_duplicate_member_is_refused(tmp_path: Path) -> None:
    members = read_members(factories.write_torchscript(tmp_path))
    data_pkl = member(members, "data.pkl")
    path = write_members(tmp_path / "dup.pt", [*members, (data_pkl, dict(members)[data_pkl])])
    assert "two members named" in assert_one_line_refusal(path, FormatError)


# -- .slim bundles --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slim")
    lm = factories.tied_lm()
    model = module_model(folder / "lm.pt", "torch-module", lm,
                         inputs=[TensorSpec("ids", factories.TIED_LM_INPUT, "int64")])
    plan = {"layers": {"head": {"quantization": {"bits": 2, "granularity": "per-channel"}}}}
    quantized = compress(model, Plan.from_dict(plan), measure=False)[0]
    ids = np.random.default_rng(0).integers(0, factories.TIED_LM_VOCAB, (4, 5))
    export(quantized, model, folder / "lm.slim", data=ArraySource(ids, None, "ids"),
           measure=False)
    return folder / "lm.slim"


def manifest_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Members], Members]:
    return lambda members: edit_json(members, MANIFEST, change)


def entry(manifest: dict[str, Any], encoding: str) -> dict[str, Any]:
    return next(e for e in manifest["tensors"] if e.get("encoding") == encoding)


def huge_without_data(manifest: dict[str, Any]) -> None:
    manifest["tensors"].append({"name": "huge", "shape": [50000, 50000], "dtype": "float32",
                                "encoding": "plain", "stored_dtype": "float32",
                                "values": "tensors/huge/values"})


BAD_BUNDLES: dict[str, tuple[Callable[[Members], Members], str]] = {
    "shape-without-data": (manifest_edit(huge_without_data), "no member"),
    "shape-larger-than-data": (manifest_edit(
        lambda m: entry(m, "plain").update(shape=[50000, 50000])), "not the"),
    "codes-too-short": (manifest_edit(lambda m: entry(m, "quantized").pop("mask")),
                        "its shape needs"),
    "scales-do-not-fit": (manifest_edit(lambda m: entry(m, "quantized").update(
        scale_shape=[1])), "scales do not fit"),
    "unknown-encoding": (manifest_edit(lambda m: entry(m, "plain").update(encoding="zstd")),
                         "unknown encoding"),
    "unknown-dtype": (manifest_edit(lambda m: entry(m, "plain").update(dtype="object")),
                      "dtype"),
    "shape-not-a-list": (manifest_edit(lambda m: entry(m, "plain").update(shape="big")),
                         "shape"),
    "tensors-not-a-list": (manifest_edit(lambda m: m.update(tensors={"a": 1})),
                           "lists no tensors"),
    "bits-a-string": (manifest_edit(lambda m: entry(m, "quantized").update(bits="8")), "bits"),
    "wrong-code-offset": (manifest_edit(lambda m: entry(m, "quantized").update(code_offset=7)),
                          "code offset"),
    "alias-of-nothing": (manifest_edit(lambda m: m["tensors"].append(
        {"name": "x", "encoding": "alias", "of": "nowhere"})), "not stored"),
    "manifest-not-json": (lambda ms: replace(ms, MANIFEST, b"{not json"), "not valid JSON"),
    "duplicate-manifest": (lambda ms: [*ms, (MANIFEST, dict(ms)[MANIFEST])],
                           "two members named"),
}


@pytest.mark.parametrize("case", BAD_BUNDLES, ids=str)
def test_bad_bundles_fail_with_one_line(case: str, slim: Path, tmp_path: Path) -> None:
    rewrite, fragment = BAD_BUNDLES[case]
    path = write_members(tmp_path / "bad.slim", rewrite(read_members(slim)),
                         {name: zipfile.ZIP_DEFLATED for name, _ in read_members(slim)})
    assert fragment in assert_one_line_refusal(path, FormatError)


def test_bundle_zip_bomb_is_refused(slim: Path, tmp_path: Path) -> None:
    members = [*read_members(slim), ("tensors/bomb", bytes(64 << 20))]
    path = write_members(tmp_path / "bomb.slim", members, {"tensors/bomb": zipfile.ZIP_DEFLATED})
    assert "zip bomb" in assert_one_line_refusal(path, FormatError)


def test_untouched_bundle_still_loads(slim: Path, tmp_path: Path) -> None:
    copy = shutil.copy(slim, tmp_path / "copy.slim")
    model = load_model(copy)
    assert model.format == "slimscope-bundle" and model.module is not None
