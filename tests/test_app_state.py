"""The Qt-free application state: events on change, and one reset per model (engine.app_state)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.app_state import FIELDS, PER_MODEL_FIELDS, AppState, Change
from engine.data import DataSpec


class Recorder:
    """Every change of every field, in order, as (field, value)."""

    def __init__(self, state: AppState) -> None:
        self.seen: list[tuple[str, Any]] = []
        state.subscribe_all(self.on_change)

    def on_change(self, change: Change) -> None:
        self.seen.append((change.field, change.value))

    def fields(self) -> list[str]:
        return [field for field, _ in self.seen]


def test_a_field_announces_each_change_once_and_nothing_for_the_same_value() -> None:
    state = AppState()
    layers: list[str] = []
    unsubscribe = state.subscribe("selected_layer", layers.append)
    assert state.set("selected_layer", "conv1") is True
    assert state.set("selected_layer", "conv1") is False  # equal value: no event
    state.set("selected_layer", "fc")
    assert layers == ["conv1", "fc"] and state.selected_layer == "fc"
    unsubscribe()
    state.set("selected_layer", "conv2")
    assert layers == ["conv1", "fc"]


def test_objects_are_compared_by_identity_and_force_announces_anyway() -> None:
    state = AppState()
    results: list[Any] = []
    state.subscribe("sensitivity", results.append)
    first, second = object(), object()
    state.set("sensitivity", first)
    state.set("sensitivity", first)
    state.set("sensitivity", second)
    state.set("sensitivity", second, force=True)
    assert results == [first, second, second]


def test_an_unknown_field_is_refused() -> None:
    state = AppState()
    with pytest.raises(KeyError, match="no field 'selection'"):
        state.set("selection", "x")
    with pytest.raises(KeyError):
        state.subscribe("selection", print)


def test_update_sets_every_field_before_anyone_hears() -> None:
    state = AppState()
    seen: list[tuple[str, list[str]]] = []
    state.subscribe("selected_layer", lambda name: seen.append((name, list(state.selected_layers))))
    assert state.update(selected_layers=["b", "c"], selected_layer="b") == ["selected_layer", "selected_layers"]
    assert seen == [("b", ["b", "c"])]  # the listener of one field saw the other already set


def _dirty(state: AppState, model: object) -> dict[str, Any]:
    """Give every field a non-default value; returns the values set."""
    values = {"model": model, "selected_layer": "conv1", "selected_layers": ["conv1", "fc"],
              "plan": {"version": 1, "layers": {"conv1": {"prune": {"amount": 0.5}}}},
              "sensitivity": object(), "data": DataSpec(evaluation="digits.npz", limit=10),
              "result": object(), "jobs": {"load": "load a.onnx"}}
    for field, value in values.items():
        state.set(field, value)
    return values


def test_reset_for_model_clears_exactly_the_per_model_fields() -> None:
    state = AppState()
    old, new = object(), object()
    before = _dirty(state, old)
    recorder = Recorder(state)
    announced = state.reset_for_model(new)
    assert state.model is new
    assert (state.selected_layer, state.selected_layers, state.sensitivity, state.data, state.result) == (
        "", [], None, DataSpec(), None)
    # the plan (the window asks Keep / Discard) and the running jobs are not the model's to clear
    assert state.plan == before["plan"] and state.jobs == before["jobs"]
    assert set(PER_MODEL_FIELDS) == {"selected_layer", "selected_layers", "sensitivity", "data", "result"}
    assert announced == recorder.fields() == [f for f in FIELDS if f in (*PER_MODEL_FIELDS, "model")]
    assert announced.index("sensitivity") < announced.index("model")  # no view sees old results


def test_reset_announces_only_what_changed_but_always_the_model() -> None:
    state = AppState()
    model = object()
    recorder = Recorder(state)
    assert state.reset_for_model(model) == ["model"]
    state.reset_for_model(model)  # the same model opened again: views rebuild
    assert recorder.fields() == ["model", "model"]


def test_listeners_see_the_whole_new_state_during_a_reset() -> None:
    state = AppState()
    _dirty(state, object())
    new = object()
    seen: list[tuple[Any, Any, str]] = []
    state.subscribe("result", lambda _r: seen.append((state.model, state.result, state.selected_layer)))
    state.reset_for_model(new)
    assert seen == [(new, None, "")]


def test_fresh_lists_are_not_shared_between_models() -> None:
    state = AppState()
    state.reset_for_model(object())
    first = state.selected_layers
    state.reset_for_model(object())
    assert state.selected_layers is not first


def test_jobs_by_slot() -> None:
    state = AppState()
    jobs: list[dict[str, str]] = []
    state.subscribe("jobs", jobs.append)
    state.set_job("load", "load a.onnx")
    state.set_job("compress", "compress a.onnx")
    state.set_job("load", None)
    state.set_job("load", None)  # already idle: no event
    assert jobs == [{"load": "load a.onnx"}, {"load": "load a.onnx", "compress": "compress a.onnx"},
                    {"compress": "compress a.onnx"}]

