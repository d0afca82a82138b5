"""The hostile corpus of issue 12, built at test time: crafted and broken inputs, each with the
command that feeds it to the CLI and the outcome the README promises.

Every case lives in ``<base>/<case>/``:

* ``model_dir/`` holds the inputs (model, plan, sensitivity JSON) the command names;
* ``outside/secret.bin`` is a canary the case may try to reach (ONNX external data pointing
  out, a symlink out); the tests check that no process opened it;
* ``MARKER`` is what a crafted pickle writes if its code ever runs.

Nothing binary is committed: torch, onnx and safetensors write the files here, and
:mod:`hostile.zip_writer` makes the zip bombs (4000 MiB of zeros from ~4 MB) in about a
second. A case whose file cannot be built records ``build_error`` instead of breaking the rest.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hostile.zip_writer import Member, read_members, write_zip, zero_bomb

#: Exit status of a refusal: one line on stderr (README, "Command line").
REFUSED = 2
OK = 0
#: `compress` wrote a file that did not reproduce the model (README, "Command line").
VERIFICATION_FAILED = 1
#: Opt-in cases that need gigabytes of disk: set to 1 to include them.
BIG_CASES_ENV = "SLIMSCOPE_HOSTILE_BIG"
CANARY_NAME = "secret.bin"
MARKER_NAME = "MARKER"
#: A plan every runnable model accepts; compress runs use it unless the plan is the attack.
SMALL_PLAN = "defaults:\n  quantization: {bits: 8}\n"


@dataclass
class Case:
    """One corpus entry: what to run, what must come out, and what must not change."""

    name: str
    folder: Path
    #: Arguments after ``slimscope`` (absolute paths, the process runs in `folder`).
    argv: list[str] = field(default_factory=list)
    #: Allowed exit statuses: (2,) for refusals, (0,) for files that must simply work.
    expect_exit: tuple[int, ...] = (REFUSED,)
    #: The model file the app should be asked to open (None when the attack is elsewhere).
    model: Path | None = None
    #: Files whose bytes must be identical afterwards (filled in after building).
    inputs: list[Path] = field(default_factory=list)
    #: FIFOs the case made, which nothing may block on (and which tests must unblock).
    fifos: list[Path] = field(default_factory=list)
    #: Run without root's file-permission override, so a 0000 file or a 0555 folder refuses
    #: root as it refuses anyone else (the tests run as root in CI).
    unprivileged: bool = False
    #: A file-size limit (bytes) under which write() fails with EFBIG, the path a full disk takes.
    file_size_limit: int | None = None
    build_error: str | None = None

    @property
    def model_dir(self) -> Path:
        return self.folder / "model_dir"

    @property
    def outside(self) -> Path:
        return self.folder / "outside"

    @property
    def canary(self) -> Path:
        return self.outside / CANARY_NAME

    @property
    def marker(self) -> Path:
        return self.folder / MARKER_NAME

    @property
    def refusal(self) -> bool:
        return self.expect_exit == (REFUSED,)


Builder = Callable[[Case], None]
_BUILDERS: dict[str, Builder] = {}


def case(name: str, *, big: bool = False) -> Callable[[Builder], Builder]:
    """Register a builder; `big` cases run only when BIG_CASES_ENV is set."""

    def register(builder: Builder) -> Builder:
        if not big or os.environ.get(BIG_CASES_ENV) == "1":
            _BUILDERS[name] = builder
        return builder

    return register


def case_names() -> list[str]:
    """Names of every case, known before anything is built (for test parametrization)."""
    return list(_BUILDERS)


def build_corpus(base: Path, names: list[str] | None = None) -> dict[str, Case]:
    """Build every case (or `names`) under `base`; a failed build is recorded, not raised."""
    cases: dict[str, Case] = {}
    for name in names or case_names():
        item = Case(name, base / name)
        item.model_dir.mkdir(parents=True)
        item.outside.mkdir()
        item.canary.write_bytes(_floats(12))  # a plausible 4x3 float32 weight, 48 bytes
        try:
            _BUILDERS[name](item)
        except Exception:  # noqa: BLE001 - one broken builder must not hide the other cases
            item.build_error = traceback.format_exc(limit=4)
        item.inputs = _regular_files(item.folder)
        cases[name] = item
    return cases


def _regular_files(folder: Path) -> list[Path]:
    found = []
    for root, _dirs, files in os.walk(folder):
        for file_name in files:
            path = Path(root) / file_name
            if path.is_file() and not path.is_symlink():
                found.append(path)
    return sorted(found)


# -- shared ingredients -----------------------------------------------------------------------
def _floats(count: int) -> bytes:
    import numpy as np

    return np.linspace(-1.0, 1.0, count, dtype=np.float32).tobytes()


def demo_copy(folder: Path, name: str = "digits_cnn.safetensors") -> Path:
    """The bundled demo model copied into `folder`: runnable, a second or two to load."""
    from engine.demo import DEMO_MODEL

    target = folder / name
    shutil.copyfile(DEMO_MODEL, target)
    return target


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _fifo(item: Case, name: str) -> Path:
    """A named pipe in the model folder, registered so the tests can unblock a reader."""
    fifo = item.model_dir / name
    os.mkfifo(fifo)
    item.fifos.append(fifo)
    return fifo


def _small_plan(item: Case) -> Path:
    return _write(item.model_dir / "plan.yaml", SMALL_PLAN)


def _compress(item: Case, plan: Path, output: str = "out.onnx", *extra: str,
              model: Path | None = None) -> None:
    model = model or demo_copy(item.model_dir)
    item.argv = ["compress", str(model), "--plan", str(plan), "-o",
                 str(item.model_dir / output), "--no-measure", *extra]


class _RunsCode:
    """Pickles to a call of exec() that writes the case's marker: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({self.marker!r}, 'w').write('code from the file ran')",)


def evil_pickle(marker: Path) -> bytes:
    """A plain pickle (protocol 2) whose loading writes `marker`."""
    return pickle.dumps(_RunsCode(marker), protocol=2)


def evil_torch_save(marker: Path) -> bytes:
    """The same object written by ``torch.save`` (a zip with data.pkl), as torch.load reads it."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(_RunsCode(marker), buffer)
    return buffer.getvalue()


# -- torch.export (.pt2) ----------------------------------------------------------------------
_PT2_CACHE: dict[str, bytes] = {}


def _benign_pt2_bytes() -> bytes:
    """A tiny exported program with a Linear, a buffer and a lifted tensor constant."""
    if "benign" not in _PT2_CACHE:
        import io

        import torch

        class Tiny(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = torch.nn.Linear(4, 3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(x) + torch.tensor([1.0, 2.0, 3.0])

        buffer = io.BytesIO()
        torch.export.save(torch.export.export(Tiny(), (torch.randn(2, 4),)), buffer)
        _PT2_CACHE["benign"] = buffer.getvalue()
    return _PT2_CACHE["benign"]


def _pt2_members(folder: Path) -> list[Member]:
    source = folder / "benign.pt2.tmp"
    source.write_bytes(_benign_pt2_bytes())
    try:
        return read_members(source)
    finally:
        source.unlink()


def _member(members: list[Member], suffix: str) -> tuple[int, Member]:
    for index, member in enumerate(members):
        if member.name.endswith(suffix):
            return index, member
    raise KeyError(suffix)


def _edit_config(members: list[Member], suffix: str, edit: Callable[[dict], None]) -> None:
    index, member = _member(members, suffix)
    data = json.loads(member.data)
    edit(data["config"])
    members[index] = Member(member.name, json.dumps(data).encode())


def _root(members: list[Member]) -> str:
    return members[0].name.split("/", 1)[0]


def _pt2_case(item: Case, craft: Callable[[list[Member], str], None], *argv: str) -> None:
    members = _pt2_members(item.model_dir)
    craft(members, _root(members))
    path = write_zip(item.model_dir / "model.pt2", members)
    item.model = path
    item.argv = [*(argv or ("inspect",)), str(path)]


@case("pt2_opaque_obj_json")
def _pt2_opaque(item: Case) -> None:
    """A constant entry marked use_pickle under a `.json` member name: plain pickle.loads."""

    def craft(members: list[Member], root: str) -> None:
        _edit_config(members, "model_constants_config.json", lambda config: config.update(
            evil={"path_name": "opaque_obj_0.json", "is_param": False, "use_pickle": True,
                  "tensor_meta": None}))
        members.append(Member(f"{root}/data/constants/opaque_obj_0.json", evil_pickle(item.marker)))

    _pt2_case(item, craft)


@case("pt2_tensor_constant_json")
def _pt2_tensor_constant(item: Case) -> None:
    """The lifted tensor constant switched to use_pickle under `tensor_0.json`."""

    def craft(members: list[Member], root: str) -> None:
        def edit(config: dict) -> None:
            entry = next(iter(config.values()))
            entry.update(path_name="tensor_0.json", use_pickle=True)

        _edit_config(members, "model_constants_config.json", edit)
        members.pop(_member(members, "data/constants/tensor_0")[0])  # no orphan to trip on
        members.append(Member(f"{root}/data/constants/tensor_0.json", evil_torch_save(item.marker)))

    _pt2_case(item, craft, "inspect", "--json")


def _weight_as(member_name: str) -> Callable[[Case], None]:
    def build(item: Case) -> None:
        def craft(members: list[Member], root: str) -> None:
            def edit(config: dict) -> None:
                config["fc.weight"].update(path_name=member_name, use_pickle=True)

            _edit_config(members, "model_weights_config.json", edit)
            members.pop(_member(members, "data/weights/weight_0")[0])  # no orphan to trip on
            members.append(Member(f"{root}/data/weights/{member_name}",
                                  evil_torch_save(item.marker)))

        _pt2_case(item, craft)

    return build


case("pt2_weight_json")(_weight_as("weight_0.json"))
case("pt2_weight_version")(_weight_as("version"))
case("pt2_weight_byteorder")(_weight_as("byteorder"))


@case("pt2_duplicate_member")
def _pt2_duplicate(item: Case) -> None:
    """Two members named weight_0: torch's reader picks the evil copy, Python's zipfile the
    benign pickled tensor (the last of the two).

    Which copy torch's reader (miniz, a binary search over a heap-sorted index) finds depends
    on where the copies sit, so the layout is searched until torch really reads the evil one.
    """
    import io

    import torch

    members = _pt2_members(item.model_dir)
    _edit_config(members, "model_weights_config.json",
                 lambda config: config["fc.weight"].update(use_pickle=True))
    index, benign = _member(members, "data/weights/weight_0")
    evil = Member(benign.name, evil_torch_save(item.marker))
    tensor = io.BytesIO()
    torch.save(torch.zeros(3, 4), tensor)
    others = members[:index] + members[index + 1:]
    path = item.model_dir / "model.pt2"
    record = benign.name.split("/", 1)[1]
    for position in range(len(others), 0, -1):  # the benign copy as late as torch allows
        write_zip(path, [evil, *others[:position], Member(benign.name, tensor.getvalue()),
                         *others[position:]])
        if torch._C.PyTorchFileReader(str(path)).get_record(record) == evil.data:
            break
    else:
        raise RuntimeError("no layout makes torch read the first of two same-named members")
    item.model = path
    item.argv = ["compress", str(path), "--plan", str(_small_plan(item)), "-o",
                 str(item.model_dir / "out.pt2"), "--no-measure"]


@case("pt2_bomb_member")
def _pt2_bomb(item: Case) -> None:
    _pt2_case(item, lambda members, root: members.append(zero_bomb(f"{root}/extra/bomb.bin")))


# -- plain pickles ----------------------------------------------------------------------------
@case("pt_pickle_runs_code")
def _pt_pickle(item: Case) -> None:
    path = item.model_dir / "model.pt"
    path.write_bytes(evil_torch_save(item.marker))
    item.model = path
    item.argv = ["inspect", str(path)]


@case("raw_pickle_runs_code")
def _raw_pickle(item: Case) -> None:
    path = item.model_dir / "model.pkl"
    path.write_bytes(evil_pickle(item.marker))
    item.model = path
    item.argv = ["inspect", "--json", str(path)]


def _protocol(version: int) -> Callable[[Case], None]:
    def build(item: Case) -> None:
        import torch

        path = item.model_dir / f"state_p{version}.pt"
        torch.save({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, path,
                   pickle_protocol=version)
        item.model = path
        item.argv = ["inspect", str(path)]
        # torch's weights-only reader refuses these protocols (with a two-line warning); a
        # reader that learns them may open the file.
        item.expect_exit = (REFUSED, OK)

    return build


case("pt_protocol4_warning")(_protocol(4))
case("pt_protocol5_warning")(_protocol(5))


@case("pt_data_pkl_bomb")
def _pt_bomb(item: Case) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"fc.weight": torch.zeros(3, 4)}, buffer)
    source = item.model_dir / "tmp.zip"
    source.write_bytes(buffer.getvalue())
    members = read_members(source)
    source.unlink()
    index, data_pkl = _member(members, "/data.pkl")
    members[index] = zero_bomb(data_pkl.name)
    item.model = write_zip(item.model_dir / "model.pt", members)
    item.argv = ["inspect", str(item.model)]


# -- ONNX -------------------------------------------------------------------------------------
def _onnx_model(item: Case, weight: object, name: str = "model.onnx") -> Path:
    """X[1,4] @ W -> Y, with `weight` (a TensorProto named W) as the initializer."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3])],
        initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = item.model_dir / name
    path.write_bytes(model.SerializeToString())  # no library pass that could fix or follow it
    item.model = path
    item.argv = ["inspect", str(path)]
    return path


def _raw_weight(dims: list[int], raw: bytes, data_type: int | None = None) -> object:
    from onnx import TensorProto

    weight = TensorProto(name="W", data_type=data_type or TensorProto.FLOAT)
    weight.dims.extend(dims)
    weight.raw_data = raw
    return weight


def _external_weight(location: str, offset: int = 0, length: int = 48) -> object:
    from onnx import TensorProto

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT,
                         data_location=TensorProto.EXTERNAL)
    weight.dims.extend([4, 3])
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return weight


@case("onnx_external_absolute")
def _onnx_absolute(item: Case) -> None:
    # The issue used /etc/passwd; an absolute canary is as absolute and can be watched.
    _onnx_model(item, _external_weight(str(item.canary)))


@case("onnx_external_parent")
def _onnx_parent(item: Case) -> None:
    _onnx_model(item, _external_weight(f"../outside/{CANARY_NAME}"))


@case("onnx_external_deep_parent")
def _onnx_deep_parent(item: Case) -> None:
    _onnx_model(item, _external_weight(f"../../{item.name}/outside/{CANARY_NAME}"))
    item.argv.insert(1, "--json")


@case("onnx_external_symlink_out")
def _onnx_symlink(item: Case) -> None:
    os.symlink(f"../outside/{CANARY_NAME}", item.model_dir / "weights.bin")
    _onnx_model(item, _external_weight("weights.bin"))


def _external_span(offset: int, length: int) -> Callable[[Case], None]:
    def build(item: Case) -> None:
        (item.model_dir / "weights.bin").write_bytes(_floats(12))
        _onnx_model(item, _external_weight("weights.bin", offset, length))

    return build


case("onnx_external_negative_offset")(_external_span(-16, 48))
case("onnx_external_negative_length")(_external_span(0, -4))


def _dims(dims: list[int], raw_bytes: int) -> Callable[[Case], None]:
    def build(item: Case) -> None:
        _onnx_model(item, _raw_weight(dims, bytes(raw_bytes)))

    return build


case("onnx_dims_1e6_by_1e6_16_bytes")(_dims([10**6, 10**6], 16))
case("onnx_dims_2p32_by_2p32")(_dims([2**32, 2**32], 16))
case("onnx_dims_negative")(_dims([-1, -16], 64))
case("onnx_dims_minus4_by_4")(_dims([-4, 4], 64))


@case("onnx_string_initializer")
def _onnx_string(item: Case) -> None:
    from onnx import TensorProto

    weight = TensorProto(name="W", data_type=TensorProto.STRING)
    weight.dims.extend([4, 3])
    weight.string_data.extend([b"x" * 8] * 12)
    _onnx_model(item, weight)


@case("onnx_10k_initializers")
def _onnx_many(item: Case) -> None:
    """A chain of 10,000 MatMuls: big graphs must open in seconds (expected to succeed)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    count = 10_000
    weight = np.eye(4, dtype=np.float32)
    nodes = [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"fc{i}")
             for i in range(count)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(f"h{count}", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(weight, f"w{i}") for i in range(count)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    item.model = item.model_dir / "chain.onnx"
    item.model.write_bytes(model.SerializeToString())
    item.argv = ["inspect", str(item.model)]
    item.expect_exit = (OK,)


# -- safetensors ------------------------------------------------------------------------------
@case("safetensors_10k_tensors")
def _safetensors_many(item: Case) -> None:
    """10,000 small tensors: one header parse, not one per tensor (expected to succeed)."""
    import numpy as np
    from safetensors.numpy import save_file

    weight = np.ones((4, 4), dtype=np.float32)
    item.model = item.model_dir / "many.safetensors"
    save_file({f"blocks.{i}.fc.weight": weight for i in range(10_000)}, str(item.model))
    item.argv = ["inspect", str(item.model)]
    item.expect_exit = (OK,)


@case("safetensors_negative_input_shape")
def _safetensors_shape(item: Case) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from engine import zoo

    item.model = item.model_dir / "weights.safetensors"
    save_file({"fc.weight": np.ones((3, 4), dtype=np.float32)}, str(item.model),
              metadata={zoo.INPUT_SHAPE_METADATA_KEY: "-1,-8"})
    item.argv = ["inspect", str(item.model)]


@case("safetensors_4gb_tensor", big=True)
def _safetensors_big(item: Case) -> None:
    """One real 4 GiB tensor (a sparse file): inspect must stream it, not hold it (opt-in)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 30],
                               "data_offsets": [0, 4 << 30]}}).encode()
    header += b" " * (-len(header) % 8)
    item.model = item.model_dir / "big.safetensors"
    with item.model.open("wb") as out:
        out.write(len(header).to_bytes(8, "little") + header)
        out.truncate(8 + len(header) + (4 << 30))
    item.argv = ["inspect", str(item.model)]
    item.expect_exit = (OK,)


# -- .slim bundles ----------------------------------------------------------------------------
def _bundle_members(item: Case, shapes: dict[str, list[int]] | None = None,
                    empty: frozenset[str] = frozenset()) -> list[Member]:
    """A zoo bundle of the demo's weights, stored plain; `shapes` overrides manifest shapes and
    tensors named in `empty` get no data at all."""
    from safetensors.numpy import load_file

    from engine.demo import DEMO_MODEL

    state = load_file(str(DEMO_MODEL))
    members: list[Member] = []
    entries = []
    for index, (name, array) in enumerate(sorted(state.items())):
        values = f"tensors/{index}/values"
        entries.append({"name": name, "shape": (shapes or {}).get(name, list(array.shape)),
                        "dtype": str(array.dtype), "encoding": "plain",
                        "stored_dtype": str(array.dtype), "values": values})
        members.append(Member(values, b"" if name in empty else array.tobytes()))
    manifest = {"format": "slimscope-bundle", "version": 1,
                "architecture": {"kind": "zoo", "name": "digits_cnn"}, "tensors": entries,
                "plan": {}, "low_rank": {}, "channels": {}, "activation_quant": None,
                "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}],
                "outputs": [], "source": {}, "notes": []}
    return [Member("slimscope-bundle.json", json.dumps(manifest).encode()), *members]


def _huge_slim(side: int) -> Callable[[Case], None]:
    def build(item: Case) -> None:
        name = "classifier.1.weight"
        members = _bundle_members(item, {name: [side, side]}, frozenset({name}))
        item.model = write_zip(item.model_dir / "model.slim", members)
        item.argv = ["inspect", str(item.model)]

    return build


case("slim_shape_50000_no_data")(_huge_slim(50_000))
case("slim_shape_20000_no_data")(_huge_slim(20_000))


@case("slim_zip_bomb")
def _slim_bomb(item: Case) -> None:
    members = _bundle_members(item)
    index, values = _member(members, "tensors/0/values")
    members[index] = zero_bomb(values.name)
    item.model = write_zip(item.model_dir / "model.slim", members)
    item.argv = ["inspect", str(item.model)]


@case("control_slim_bundle")
def _slim_control(item: Case) -> None:
    """The hand-made bundle unharmed: proves the bundle cases above are read as bundles."""
    item.model = write_zip(item.model_dir / "model.slim", _bundle_members(item))
    item.argv = ["inspect", str(item.model)]
    item.expect_exit = (OK,)


@case("control_demo_copy")
def _demo_control(item: Case) -> None:
    item.model = demo_copy(item.model_dir)
    item.argv = ["inspect", "--json", str(item.model)]
    item.expect_exit = (OK,)


# -- plans ------------------------------------------------------------------------------------
@case("plan_yaml_billion_laughs")
def _laughs(item: Case) -> None:
    """Under 1 KB of YAML whose aliases expand to 9**10 strings, all inside the one field a
    plan has, so that any walk over (or repr of) the value expands it."""
    lines = ["defaults:", '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        lines.append(f"  - &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    plan = _write(item.model_dir / "laughs.yaml", "\n".join(lines) + "\n")
    assert plan.stat().st_size < 1024
    _compress(item, plan)


def _nested(suffix: str, depth: int = 50_000) -> Callable[[Case], None]:
    def build(item: Case) -> None:
        body = "[" * depth + "]" * depth
        text = (f'{{"defaults": {body}}}' if suffix == "json" else f"defaults: {body}\n")
        _compress(item, _write(item.model_dir / f"nested.{suffix}", text))

    return build


case("plan_nested_50k_json")(_nested("json"))
case("plan_nested_50k_yaml")(_nested("yaml"))


@case("plan_nm_5000_digits")
def _nm_digits(item: Case) -> None:
    plan = _write(item.model_dir / "nm.yaml", "defaults:\n  pruning: {method: nm, pattern: \""
                  + "9" * 5000 + ':4"}\n')
    _compress(item, plan)


@case("plan_fifo")
def _plan_fifo(item: Case) -> None:
    fifo = _fifo(item, "plan.yaml")
    _compress(item, fifo)


@case("plan_regex_long_layer_names")
def _regex(item: Case) -> None:
    """`re:(a+)+b` against layer names of 5,000 characters, on a runnable (.pt2) model.

    A backtracking engine never finishes; a linear-time one matches the third layer and a
    guard refuses the pattern: either ends well within the time limit. The program is
    exported with a fixed batch (a symbolic one would itself need trust), so the compressed
    file may fail its verification at another batch size: exit 1 is accepted here, as long as
    it is that verdict and not an internal error.
    """
    import io

    import torch

    names = ["a" * 5000, "a" * 4999 + "c", "a" * 4999 + "b"]

    class LongNames(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in names:
                self.add_module(name, torch.nn.Linear(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for child in self.children():
                x = child(x)
            return x

    buffer = io.BytesIO()
    torch.export.save(torch.export.export(LongNames(), (torch.randn(1, 4),)), buffer)
    model = item.model_dir / "long_names.pt2"
    model.write_bytes(buffer.getvalue())
    plan = _write(item.model_dir / "regex.yaml",
                  "patterns:\n  're:(a+)+b':\n    quantization: {bits: 8}\n")
    _compress(item, plan, "out.pt", model=model)
    item.expect_exit = (REFUSED, OK, VERIFICATION_FAILED)


# -- outputs that would destroy an input ------------------------------------------------------
@case("compress_report_is_model")
def _report_model(item: Case) -> None:
    _compress(item, _small_plan(item))
    item.argv += ["--report", item.argv[1]]


@case("compress_report_is_plan")
def _report_plan(item: Case) -> None:
    plan = _small_plan(item)
    _compress(item, plan)
    item.argv += ["--report", str(plan)]


@case("compress_output_is_directory")
def _output_directory(item: Case) -> None:
    (item.model_dir / "out.onnx").mkdir()
    _compress(item, _small_plan(item))


@case("compress_output_missing_folder")
def _output_missing(item: Case) -> None:
    _compress(item, _small_plan(item), "no/such/folder/out.onnx")


@case("sensitivity_output_is_model")
def _sensitivity_model(item: Case) -> None:
    model = demo_copy(item.model_dir)
    item.argv = ["sensitivity", str(model), "--method", "datafree", "-o", str(model)]


def _sensitivity_json(item: Case, model: Path) -> Path:
    """A real sensitivity file for `model`, made by the engine itself (data-free, fast)."""
    import contextlib
    import io

    from engine.cli import main

    path = item.model_dir / "sens.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = main(["sensitivity", str(model), "--method", "datafree", "-o", str(path)])
    if status != 0 or not path.is_file():
        raise RuntimeError(f"could not make a sensitivity file (exit {status})")
    return path


@case("plan_output_is_sensitivity")
def _plan_over_sensitivity(item: Case) -> None:
    model = demo_copy(item.model_dir)
    sens = _sensitivity_json(item, model)
    item.argv = ["plan", str(model), "--sensitivity", str(sens), "--target-size", "0.5",
                 "-o", str(sens)]


@case("plan_report_is_model")
def _plan_report_model(item: Case) -> None:
    model = demo_copy(item.model_dir)
    sens = _sensitivity_json(item, model)
    item.argv = ["plan", str(model), "--sensitivity", str(sens), "--target-size", "0.5",
                 "-o", str(item.model_dir / "plan.yaml"), "--report", str(model)]


@case("plan_from_nan_sensitivity")
def _plan_nan_sensitivity(item: Case) -> None:
    """Every measured level NaN (json writes NaN): no plan reaches 0.5, and it says why."""
    model = demo_copy(item.model_dir)
    sens = _sensitivity_json(item, model)
    data = json.loads(sens.read_text())
    for layer in data["layers"]:
        for curve in layer["curves"].values():
            curve["delta"] = [float("nan")] * len(curve["delta"])
    sens.write_text(json.dumps(data))
    item.argv = ["plan", str(model), "--sensitivity", str(sens), "--target-size", "0.5",
                 "-o", str(item.model_dir / "plan.yaml")]


# -- files that are not files, and names that are not names -----------------------------------
@case("model_fifo")
def _model_fifo(item: Case) -> None:
    fifo = _fifo(item, "model.onnx")
    item.model = fifo
    item.argv = ["inspect", str(fifo)]


@case("model_proc_self_mem")
def _proc_mem(item: Case) -> None:
    item.model = Path("/proc/self/mem")
    item.argv = ["inspect", "/proc/self/mem"]


@case("model_name_too_long")
def _long_name(item: Case) -> None:
    # Running as root, chmod 000 still reads; a 300-character name cannot even be stat'ed.
    item.model = item.model_dir / ("x" * 300 + ".onnx")
    item.argv = ["inspect", str(item.model)]


def _named(name: str, content: bytes | None) -> Callable[[Case], None]:
    def build(item: Case) -> None:
        path = item.model_dir / name
        if content is not None:
            path.write_bytes(content)
        item.model = path
        item.argv = ["inspect", str(path)]

    return build


case("name_with_newline")(_named("two\nlines.onnx", b"not a model at all\n"))
case("name_with_ansi_escape")(_named("red\x1b[31mALERT\x1b[0m.onnx", b"not a model at all\n"))
case("name_with_newline_missing")(_named("gone\nslimscope: error: fake.onnx", None))


@case("name_with_ansi_pickle")
def _ansi_pickle(item: Case) -> None:
    """A pickle refusal quotes the file's name: the name carries a terminal escape."""
    path = item.model_dir / "\x1b]0;title\x07evil.pt"
    path.write_bytes(evil_torch_save(item.marker))
    item.model = path
    item.argv = ["inspect", str(path)]


# -- the environment refuses: permissions and a full disk ----------------------------------
@case("compress_model_unreadable")
def _unreadable_model(item: Case) -> None:
    model = demo_copy(item.model_dir)
    model.chmod(0)
    item.unprivileged = True
    _compress(item, _small_plan(item), model=model)


@case("compress_output_read_only_folder")
def _read_only_output(item: Case) -> None:
    folder = item.model_dir / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    item.unprivileged = True
    _compress(item, _small_plan(item), "read_only/out.onnx")


@case("compress_output_disk_full")
def _disk_full(item: Case) -> None:
    """The write fails after the guard passed: the previous file stays, no .part is left."""
    _write(item.model_dir / "out.onnx", "the previous export\n")
    item.file_size_limit = 16 * 1024  # the demo's ONNX export is ~130 KiB
    _compress(item, _small_plan(item))


# -- data files: read through the same guard as models ---------------------------------------
def _sensitivity_with_data(item: Case, data: Path) -> None:
    model = demo_copy(item.model_dir)
    item.argv = ["sensitivity", str(model), "--method", "exact", "--data", str(data),
                 "-o", str(item.model_dir / "sens.json")]


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


@case("data_fifo")
def _data_fifo(item: Case) -> None:
    fifo = _fifo(item, "calibration.npz")
    _sensitivity_with_data(item, fifo)


@case("data_npy_header_claims_4tb")
def _data_npy_claims(item: Case) -> None:
    path = item.model_dir / "inputs.npy"
    path.write_bytes(_npy_header((1_000_000, 1, 1000, 1000)) + _floats(16))
    _sensitivity_with_data(item, path)


@case("data_npz_member_claims_more")
def _data_npz_claims(item: Case) -> None:
    path = item.model_dir / "inputs.npz"
    write_zip(path, [Member("x.npy", _npy_header((20_000, 1, 8, 8)) + _floats(16))])
    _sensitivity_with_data(item, path)


@case("data_npz_object_array_runs_code")
def _data_npz_pickle(item: Case) -> None:
    import numpy as np

    path = item.model_dir / "inputs.npz"
    with path.open("wb") as handle:
        np.savez(handle, x=np.array([_RunsCode(item.marker)], dtype=object))
    _sensitivity_with_data(item, path)


@case("data_npz_bomb")
def _data_npz_bomb(item: Case) -> None:
    """16M well-formed digits (float32 zeros, the demo's 1x8x8) in 4 MB: 4000 MiB to inflate."""
    path = item.model_dir / "inputs.npz"
    write_zip(path, [zero_bomb("x.npy", _npy_header((16_384_000, 1, 8, 8)))])
    _sensitivity_with_data(item, path)


@case("data_npz_duplicate_member")
def _data_npz_duplicate(item: Case) -> None:
    import numpy as np

    good = item.model_dir / "good.npz"
    np.savez(good, x=np.zeros((4, 1, 8, 8), np.float32))
    members = read_members(good)
    good.unlink()
    path = item.model_dir / "inputs.npz"
    write_zip(path, [Member("x.npy", _npy_header((1 << 20, 1, 8, 8)) + _floats(16)), *members])
    _sensitivity_with_data(item, path)


def _png(width: int, height: int, idat: bytes) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@case("data_image_decompression_bomb")
def _data_image_bomb(item: Case) -> None:
    """A PNG header claiming 60000x60000 pixels (3.4 GB of grey) in a folder of images."""
    import zlib

    folder = item.model_dir / "images"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(_png(60_000, 60_000, zlib.compress(bytes(60_001))))
    _sensitivity_with_data(item, folder)


@case("data_image_corrupt")
def _data_image_corrupt(item: Case) -> None:
    folder = item.model_dir / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(_png(8, 8, b"not a deflate stream"))
    _sensitivity_with_data(item, folder)
