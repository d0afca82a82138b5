"""Hostile plan, sensitivity and JSON text: refused in one short line, fast, in bounded memory.

Each case here once cost minutes, gigabytes or an internal error (issue 12): YAML alias bombs,
50,000-deep nesting, catastrophic regular expressions, 5,000-digit N:M patterns, FIFOs, and
plain data of the wrong type anywhere in a plan or a sensitivity file.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import pytest

from engine.errors import PlanError, SlimscopeError
from engine.parsing import MAX_YAML_BYTES, quote, read_json
from engine.plan import Plan, Pruning, pattern_matches
from engine.sensitivity import Sensitivity

LAYERS = {"features.0": "Conv2d", "features.3": "Conv2d", "classifier.1": "Linear"}
PRUNE = {"pruning": {"method": "magnitude", "amount": 0.5}}
#: Longest message a refusal may print: one readable terminal line or two.
MESSAGE_LIMIT = 200

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
layers: *i
"""


def one_line(error: BaseException) -> str:
    """The error's message, after checking it is one short line."""
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert 0 < len(message) <= MESSAGE_LIMIT, f"{len(message)} chars: {message[:300]}"
    return message


def refused(call: Callable[[], Any], error: type[Exception] = SlimscopeError,
            seconds: float = 1.0) -> str:
    """Run `call`, which must raise `error` within `seconds`; return its one-line message."""
    start = time.perf_counter()
    with pytest.raises(error) as info:
        call()
    assert time.perf_counter() - start < seconds
    return one_line(info.value)


# -- YAML and JSON text -----------------------------------------------------------------------
def test_billion_laughs_is_refused_at_once_in_bounded_memory(tmp_path: Path) -> None:
    plan = tmp_path / "laughs.yaml"
    plan.write_text(BILLION_LAUGHS)
    tracemalloc.start()
    try:
        message = refused(lambda: Plan.load(plan), PlanError)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "aliases" in message and "line 1" in message
    assert peak < 8 << 20


def test_a_single_anchor_is_refused_too(tmp_path: Path) -> None:
    plan = tmp_path / "anchor.yaml"
    plan.write_text("defaults: &d {pruning: {method: magnitude, amount: 0.5}}\n")
    assert "anchors" in refused(lambda: Plan.load(plan), PlanError)


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_plans_nested_50k_deep_are_one_line(tmp_path: Path, suffix: str) -> None:
    plan = tmp_path / f"deep.{suffix}"
    plan.write_text('{"layers": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert "nested more than 64 levels" in refused(lambda: Plan.load(plan), PlanError)


def test_json_nested_50k_deep_is_one_line_for_every_reader(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    assert "nested" in refused(lambda: read_json(deep))
    assert "nested" in refused(lambda: Sensitivity.load(deep))
    shallow_but_too_deep = tmp_path / "hundred.json"
    shallow_but_too_deep.write_text('{"a": ' + "[" * 100 + "]" * 100 + "}")
    assert "nested more than 64" in refused(lambda: read_json(shallow_but_too_deep))


def test_oversized_yaml_plan_is_refused_before_parsing(tmp_path: Path) -> None:
    plan = tmp_path / "big.yaml"
    plan.write_text("# " + "x" * MAX_YAML_BYTES + "\n")
    assert "MiB" in refused(lambda: Plan.load(plan), PlanError)


@pytest.mark.parametrize("text", [
    "defaults: {pruning: {method: magnitude, amount: 1" + "1" * 5000 + "}}",  # int() refuses
    "defaults: {pruning: {method: magnitude, amount: 2024-13-45}}",  # a bad timestamp
    "defaults: !!python/object:os.system {}",
    "defaults: [unclosed",
])
def test_malformed_yaml_values_are_one_line_plan_errors(tmp_path: Path, text: str) -> None:
    plan = tmp_path / "bad.yaml"
    plan.write_text(text)
    refused(lambda: Plan.load(plan), PlanError)


def test_huge_json_numbers_are_one_line(tmp_path: Path) -> None:
    plan = tmp_path / "digits.json"
    plan.write_text('{"version": ' + "9" * 5000 + "}")
    refused(lambda: Plan.load(plan), PlanError)


@pytest.mark.parametrize("reader", ["plan", "json", "sensitivity"])
def test_a_fifo_is_refused_immediately(tmp_path: Path, reader: str) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / ("plan.yaml" if reader == "plan" else "data.json")
    os.mkfifo(fifo)
    read = {"plan": Plan.load, "json": read_json, "sensitivity": Sensitivity.load}[reader]
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            read(fifo)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread below
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(2.0)
    if worker.is_alive():  # unblock the reader so the daemon thread can finish
        with open(fifo, "w"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(outcome[0], SlimscopeError)
    assert "named pipe" in one_line(outcome[0])


def test_a_folder_or_missing_file_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "plan.yaml"
    folder.mkdir()
    assert "folder" in refused(lambda: Plan.load(folder), PlanError)
    assert "cannot read it" in refused(lambda: Plan.load(tmp_path / "absent.json"), PlanError)


def test_control_characters_in_a_file_name_stay_on_one_line(tmp_path: Path) -> None:
    plan = tmp_path / "evil\nname\x1b[31m.yaml"
    plan.write_text("version: [")
    message = refused(lambda: Plan.load(plan), PlanError)
    assert "\x1b" not in message


# -- patterns ------------------------------------------------------------------------------------
def test_catastrophic_regex_against_a_long_name_is_fast() -> None:
    long_name = "a" * 5000
    start = time.perf_counter()
    assert not pattern_matches("re:(a+)+b", long_name)
    assert not pattern_matches("re:(a|aa)*c", long_name)
    assert time.perf_counter() - start < 1.0
    plan = Plan.from_dict({"patterns": {"re:(a+)+b": PRUNE}})
    assert "matches no layer" in refused(lambda: plan.resolve({long_name: "Linear"}), PlanError)


def test_many_star_globs_against_a_long_name_are_fast() -> None:
    start = time.perf_counter()
    assert not pattern_matches("*a" * 400 + "b", "a" * 5000)
    assert not pattern_matches("*?" * 400 + "b", "a" * 5000)
    assert time.perf_counter() - start < 1.0


def test_regex_semantics_are_kept_full_match_and_alternation() -> None:
    assert pattern_matches(r"re:features\.(3|7)", "features.3")
    assert not pattern_matches(r"re:features\.(3|7)", "features.37")
    assert not pattern_matches("re:fc", "a.fc")  # full match, not search
    assert pattern_matches("re:(?P<block>a+)\\.fc", "aa.fc")
    assert pattern_matches("features.*", "features.0") and not pattern_matches("features.*", "x")


@pytest.mark.parametrize(("pattern", "expected"), [
    (r"re:(a)\1", "linear-time matcher"),
    ("re:(?=a)b", "linear-time matcher"),
    ("re:(", "invalid regular expression"),
    ("re:" + "a" * 1000, "1000 allowed"),
])
def test_patterns_a_linear_matcher_cannot_run_are_refused(
        pattern: str, expected: str, capfd: pytest.CaptureFixture[str]) -> None:
    message = refused(lambda: Plan.from_dict({"patterns": {pattern: PRUNE}}), PlanError)
    assert expected in message
    assert capfd.readouterr().err == ""  # RE2 logs nothing of its own


@pytest.mark.parametrize("pattern", ["5" * 5000 + ":" + "9" * 5000, "1:" + "9" * 5000, "2:128",
                                     "x:4"])
def test_nm_patterns_are_bounded(pattern: str) -> None:
    data = {"layers": {"classifier.1": {"pruning": {"method": "nm", "pattern": pattern}}}}
    refused(lambda: Plan.from_dict(data).resolve(LAYERS), PlanError)
    refused(lambda: Pruning("nm", pattern=pattern).nm, PlanError)


def test_yaml_sexagesimal_nm_pattern_gets_a_hint(tmp_path: Path) -> None:
    plan = tmp_path / "nm.yaml"
    plan.write_text("defaults: {pruning: {method: nm, pattern: 2:4}}\n")  # YAML 1.1 reads 124
    assert "quote it" in refused(lambda: Plan.load(plan), PlanError)


# -- plain data of any type, anywhere ------------------------------------------------------------
def _nested(levels: int, wrap: Callable[[Any], Any]) -> Any:
    value: Any = None
    for _ in range(levels):
        value = wrap(value)
    return value


HUGE_INT = 10**5000  # repr() of it raises ValueError
SCALARS = [None, True, False, 0, -1, 7, HUGE_INT, -HUGE_INT, 0.5, float("nan"), float("inf"),
           1e308, "", "keep", "nm", "2:4", "fp16", "re:(", "x" * 1_000_000, "a\nb\x1b[0m",
           "9" * 5000 + ":4", b"\x00bytes", _nested(50_000, lambda v: [v]),
           _nested(50_000, lambda v: {"pruning": v})]
KEYS = [None, 3, HUGE_INT, (1, 2), "pruning", "quantization", "low_rank", "method", "amount",
        "bits", "keep", "x" * 100_000, "\x1b[31m", "re:(a+)+b", "classifier.1"]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A random value: a hostile scalar, a 50,000-deep nest, or small lists and mappings."""
    roll = rng.randrange(4)
    if depth >= 3 or roll < 2:
        return rng.choice(SCALARS)
    if roll == 2:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def _valid_plan() -> dict[str, Any]:
    return {
        "version": 1,
        "defaults": {"pruning": {"method": "magnitude", "amount": 0.5},
                     "quantization": {"bits": 8, "granularity": "per-channel"}},
        "kinds": {"Linear": {"low_rank": {"rank": 2}}},
        "patterns": {"features.*": {"pruning": {"method": "nm", "pattern": "2:4"}}},
        "layers": {"classifier.1": "keep"},
        "activation_quant": {"calibration": "percentile", "percentile": 99.9},
        "recovery": {"epochs": 1},
    }


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into nested dicts, so junk can replace any value at any depth."""
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, prefix + (key,))
    return found


def _replaced(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(data)
    copy[path[0]] = _replaced(data[path[0]], path[1:], value)
    return copy


def test_plan_from_dict_survives_junk_anywhere() -> None:
    rng = random.Random(12)
    base = _valid_plan()
    assert Plan.from_dict(base).resolve([("features.0", "Conv2d", (8, 4, 3, 3)),
                                         ("classifier.1", "Linear", (4, 8))])
    paths = _paths(base)
    tables = [p for p in paths if isinstance(_at(base, p), dict)]
    for _ in range(400):
        if rng.random() < 0.7:  # junk in place of any value, at any depth
            data = _replaced(base, rng.choice(paths), _junk(rng))
        else:  # or a junk key beside the valid ones
            table = rng.choice(tables)
            data = _replaced(base, table, {**_at(base, table), _junk_key(rng): _junk(rng)})
        try:
            plan = Plan.from_dict(data)
            plan.resolve([("features.0", "Conv2d", (8, 4, 3, 3)), ("classifier.1", "Linear", (4, 8))])
        except PlanError as exc:
            one_line(exc)


def _at(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def _junk_key(rng: random.Random) -> Any:
    return rng.choice(KEYS)


def test_plan_error_messages_quote_at_most_a_short_value() -> None:
    huge = "y" * 1_000_000
    for data in ({"layers": {huge: PRUNE}}, {"defaults": {"pruning": {"method": huge}}},
                 {"defaults": huge}, {"version": 10**5000}, {huge: 1},
                 {"patterns": {huge[:900]: PRUNE}}):
        try:
            Plan.from_dict(data).resolve(LAYERS)
        except PlanError as exc:
            assert "yyyyy" * 20 not in one_line(exc)
        else:
            pytest.fail(f"accepted {quote(data)}")


# -- sensitivity files ---------------------------------------------------------------------------
def _valid_sensitivity() -> dict[str, Any]:
    curve = {"levels": [0.0, 0.5], "metric": [0.9, 0.8], "delta": [0.0, -0.1],
             "bytes": [64, 40], "nonzero": [16, 8], "status": ["baseline", "measured"],
             "secondary": [0.1, None]}
    return {"version": 1, "method": "exact", "metric": "accuracy", "higher_is_better": True,
            "baseline": 0.9, "quantization": {"bits": 8}, "model_bytes": 100,
            "fixed_bytes": 4, "samples": 3, "seconds": 1.5, "notes": ["n"],
            "layers": [{"name": "fc", "kind": "Linear", "shape": [4, 4],
                        "curves": {"sparsity": curve}}]}


def test_sensitivity_round_trips_through_the_bounded_reader(tmp_path: Path) -> None:
    path = tmp_path / "sens.json"
    path.write_text(json.dumps(_valid_sensitivity()))
    loaded = Sensitivity.load(path)
    assert loaded.layers[0].curves["sparsity"].bytes == [64, 40]
    assert Sensitivity.from_dict(loaded.to_dict()).to_dict() == loaded.to_dict()


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: d.pop("layers"), "missing field 'layers'"),
    (lambda d: d.update(layers={"a": 1}), "sensitivity.layers: expected a list"),
    (lambda d: d.update(layers=[7]), "sensitivity.layers[0]: expected a mapping"),
    (lambda d: d.update(model_bytes="12"), "model_bytes: expected an integer"),
    (lambda d: d.update(model_bytes=-1), "must not be negative"),
    (lambda d: d.update(higher_is_better="yes"), "higher_is_better"),
    (lambda d: d.update(quantization={"bits": "four"}), "quantization"),
    (lambda d: d.update(notes="x" * 100_000), "notes: expected a list"),
    (lambda d: d["layers"][0]["curves"]["sparsity"].update(bytes=[1]), "1 values for 2 levels"),
    (lambda d: d["layers"][0]["curves"]["sparsity"].update(bytes=[1, float("inf")]), "bytes[1]"),
    (lambda d: d["layers"][0]["curves"]["sparsity"].update(metric=[0.9, "x"]), "metric[1]"),
    (lambda d: d["layers"][0]["curves"].update(depth={}), "unknown axis"),
    (lambda d: d["layers"][0].update(shape=[-4, 4]), "negative dimension"),
    (lambda d: d["layers"][0].update(name=None), "name: expected a string"),
    (lambda d: d.update(version=10**5000), "version"),
])
def test_malformed_sensitivity_data_is_one_line(mutate: Callable[[dict[str, Any]], Any],
                                                expected: str) -> None:
    data = _valid_sensitivity()
    mutate(data)
    message = refused(lambda: Sensitivity.from_dict(data))
    assert expected in message


def test_sensitivity_from_dict_survives_junk_anywhere() -> None:
    rng = random.Random(7)
    base = _valid_sensitivity()
    paths = _paths(base)
    for _ in range(300):
        data = _replaced(base, rng.choice(paths), _junk(rng))
        try:
            Sensitivity.from_dict(data)
        except SlimscopeError as exc:
            one_line(exc)
    refused(lambda: Sensitivity.from_dict([1, 2]))  # type: ignore[arg-type]
