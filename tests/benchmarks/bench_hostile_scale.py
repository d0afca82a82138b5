"""How `slimscope inspect` copes with files at hostile scale; run on demand, not in CI.

    .venv/bin/python tests/benchmarks/bench_hostile_scale.py [--tensors 300000] [--nodes 200000]
                                                            [--big-gib 4] [--skip-big]

Builds, in a fresh temp folder that is deleted at the end whatever happens:
- a safetensors file with `--tensors` tiny tensors (a big mixture-of-experts checkpoint has tens
  of thousands; every one is a layer, so statistics run for each);
- an ONNX graph of `--nodes` nodes, a chain of MatMul + Add with small initializers;
- a `--big-gib` single fp32 tensor as safetensors, and the same bytes as an ONNX external-data
  weight (the .onnx points into the safetensors file's data area, so the disk holds them once).

Each file is inspected by `slimscope inspect FILE > /dev/null`, then with `--json`, each in a
fresh process; the table gives wall time and the child's peak resident memory (`os.wait4`
rusage, taken by a lean copy of this script so the generator's memory is not counted). The
first row, the bundled demo, is the baseline measured in the same run: start-up and imports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# -- files ----------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes | int]]) -> int:
    """A safetensors file from name -> (shape, fp32 bytes or a byte count to fill by blocks);
    written by hand so 300k tensors or 4 GB take seconds. Returns where the data area starts."""
    header: dict[str, object] = {}
    offset = 0
    for name, (shape, data) in tensors.items():
        size = data if isinstance(data, int) else len(data)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for _, data in tensors.values():
            if isinstance(data, int):
                _write_blocks(handle, data)
            else:
                handle.write(data)
    return 8 + len(text)


def _write_blocks(handle, size: int) -> None:
    """`size` bytes of normal-looking fp32 weights: one random 64 MB block, repeated."""
    import numpy as np

    block = (np.random.default_rng(0).standard_normal(16 << 20, np.float32) * 0.02).tobytes()
    while size > 0:
        handle.write(block[:size])
        size -= len(block)


def many_tensors(path: Path, count: int) -> str:
    import numpy as np

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((64, 16), np.float32)
    write_safetensors(path, {f"experts.{i}.weight": ([4, 4], pool[i % 64].tobytes())
                             for i in range(count)})
    return f"{count} tensors of 4x4"


def long_graph(path: Path, nodes: int) -> str:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 4), np.float32)
    bias = rng.standard_normal(4, np.float32)
    graph_nodes, initializers, current = [], [], "x"
    for i in range(nodes // 2):
        initializers.append(numpy_helper.from_array(weight, f"w{i}"))
        initializers.append(numpy_helper.from_array(bias, f"b{i}"))
        graph_nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        graph_nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]))
        current = f"a{i}"
    graph = helper.make_graph(
        graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, 4])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return f"{len(graph_nodes)} nodes, {len(initializers)} initializers"


def big_tensor(path: Path, gib: float) -> tuple[str, int, int]:
    side = int((gib * (1 << 30) / 4) ** 0.5)
    start = write_safetensors(path, {"big.weight": ([side, side], side * side * 4)})
    return f"1 tensor {side}x{side} fp32", start, side


def big_external(path: Path, data_file: Path, offset: int, side: int) -> str:
    """An ONNX MatMul whose weight is external data at `offset` in `data_file`."""
    import onnx
    from onnx import TensorProto, helper

    weight = TensorProto(name="big.weight", data_type=TensorProto.FLOAT, dims=[side, side],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", data_file.name), ("offset", str(offset)),
                       ("length", str(side * side * 4))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big.weight"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return f"MatMul, external {side}x{side} fp32"


# -- measuring ------------------------------------------------------------------------------
def inspect(path: Path) -> tuple[float, float, int, float, float, int]:
    """Wall seconds, peak RSS in MiB and exit status of `slimscope inspect PATH`, then the
    same for `slimscope inspect PATH --json`.

    Measured by a fresh, lean copy of this script (`--measure`): a child forked from this
    process, which holds the generated graphs, would count their pages in its peak RSS.
    """
    numbers: list[float] = []
    for extra in ([], ["--json"]):
        result = subprocess.run([sys.executable, __file__, "--measure", str(path), *extra],
                                cwd=ROOT, capture_output=True, text=True, check=True)
        wall, rss, code = result.stdout.split()
        if result.stderr.strip():
            print(f"  {path.name}: {result.stderr.strip()[-300:]}", file=sys.stderr)
        numbers += [float(wall), float(rss), int(code)]
    return tuple(numbers)  # type: ignore[return-value]


def measure(path: str, extra: list[str]) -> None:
    """Run the CLI once and print its wall time, peak RSS (MiB) and exit status."""
    command = [sys.executable, "-m", "engine.cli", "inspect", path, *extra]
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        child = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.PIPE)
        error = child.stderr.read().decode(errors="replace").strip()
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(f"exit {code}: {error[-300:]}", file=sys.stderr)
    print(f"{wall:.2f} {usage.ru_maxrss / 1024:.0f} {code}")


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=300_000)
    parser.add_argument("--nodes", type=int, default=200_000)
    parser.add_argument("--big-gib", type=float, default=4.0)
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()

    from engine.demo import DEMO_MODEL

    folder = Path(tempfile.mkdtemp(prefix="slimscope-hostile-scale-"))
    # The baseline, in the same run: the bundled demo (8 layers), i.e. start-up and imports.
    rows = [("baseline: the bundled demo", "8 layers", DEMO_MODEL.stat().st_size,
             *inspect(DEMO_MODEL))]
    try:
        cases = [("safetensors, many tensors", folder / "many.safetensors",
                  lambda p: many_tensors(p, args.tensors)),
                 ("ONNX, long graph", folder / "long.onnx", lambda p: long_graph(p, args.nodes))]
        for label, path, build in cases:
            what, build_s = _timed(lambda: build(path))
            print(f"built {path.name} ({what}) in {build_s:.1f} s", file=sys.stderr)
            rows.append((label, what, path.stat().st_size, *inspect(path)))
            path.unlink()
        if not args.skip_big:
            free = shutil.disk_usage(folder).free
            need = int(args.big_gib * (1 << 30)) + (2 << 30)
            if free < need:
                print(f"skipping the big tensor: {free >> 30} GiB free in {folder}, "
                      f"{need >> 30} needed", file=sys.stderr)
            else:
                path = folder / "big.safetensors"
                (what, start, side), build_s = _timed(lambda: big_tensor(path, args.big_gib))
                print(f"built {path.name} in {build_s:.1f} s", file=sys.stderr)
                rows.append(("safetensors, one big tensor", what, path.stat().st_size,
                             *inspect(path)))
                external = folder / "big.onnx"
                what = big_external(external, path, start, side)
                rows.append(("ONNX, external big tensor", what, path.stat().st_size,
                             *inspect(external)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    baseline_wall = rows[0][3]
    print("| file | contents | size | `inspect` wall | × baseline | peak RSS "
          "| `inspect --json` wall | peak RSS | exit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, what, size, wall, rss, code, json_wall, json_rss, json_code in rows:
        print(f"| {label} | {what} | {size / (1 << 20):,.1f} MiB | {wall:.1f} s "
              f"| {wall / baseline_wall:.1f}× | {rss:,.0f} MiB | {json_wall:.1f} s "
              f"| {json_rss:,.0f} MiB | {code}, {json_code} |")


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


if __name__ == "__main__":
    main()
