"""The one thread policy (engine/threads.py): explicit count, then OMP_NUM_THREADS, then idle
cores; torch and ONNX Runtime sessions both follow what was applied."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import onnx_tools, threads
from engine.errors import SlimscopeError

ROOT = Path(__file__).resolve().parents[1]


def test_an_explicit_count_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose(3) == 3


def test_omp_num_threads_is_respected_and_junk_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert 1 <= threads.choose() <= threads.usable_cores()


@pytest.mark.parametrize("count", [0, -3, 4 * threads.MAX_THREADS_PER_CORE * 1024])
def test_a_count_outside_the_usable_range_is_refused_in_one_line(count: int) -> None:
    with pytest.raises(SlimscopeError, match=r"--threads must lie in 1\.\.\d+ "):
        threads.choose(count)


def test_an_environment_asking_for_too_many_threads_is_capped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    assert threads.choose() == threads.MAX_THREADS_PER_CORE * threads.usable_cores()


def test_reserving_a_core_never_leaves_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    chosen = threads.choose(reserve=threads.usable_cores() + 4)
    assert chosen == 1


def test_idle_cores_reads_a_plausible_figure() -> None:
    idle = threads.idle_cores()
    assert idle is None or 0 <= idle <= (threads.os.cpu_count() or 1) + 1e-9


def test_applied_count_reaches_torch_and_new_onnx_sessions(tiny_onnx: bytes) -> None:
    before = torch.get_num_threads()
    try:
        threads.apply(1)
        assert torch.get_num_threads() == 1
        session = onnx_tools.session(tiny_onnx)
        assert session.get_session_options().intra_op_num_threads == 1
    finally:
        threads.apply(before)


def test_the_cli_applies_threads_before_the_command_runs() -> None:
    probe = ("import sys, torch\n"
             "from engine import cli\n"
             "parser = cli.build_parser()\n"
             "args = parser.parse_args(['inspect', 'demo', '--threads', '2'])\n"
             "args.handler = lambda a: print('threads', torch.get_num_threads()) or 0\n"
             "sys.exit(cli._run_command(args, args.threads))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "threads 2"


@pytest.fixture
def tiny_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()
