"""Plan resolution by priority, round trips, and a table of invalid plans with the expected error."""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml

import engine.plan as plan_module
from engine.errors import PlanError
from engine.plan import LayerPlan, LowRank, Plan, Pruning, Quantization

LAYERS = [
    ("a.fc1", "Linear", (32, 16)),
    ("a.fc2", "Linear", (32, 32)),
    ("c.fc", "Linear", (10, 32)),
    ("b.conv", "Conv2d", (8, 4, 3, 3)),
    ("b.bn", "BatchNorm2d", (8,)),
    ("emb", "Embedding", (100, 16)),
]


def prune(amount: float, method: str = "magnitude") -> dict:
    return {"pruning": {"method": method, "amount": amount}}


def amounts(resolved: dict[str, LayerPlan]) -> dict[str, float | None]:
    return {name: (lp.pruning.amount if lp.pruning else None) for name, lp in resolved.items()}


def test_priority_global_kind_pattern_exact():
    plan = Plan.from_dict({
        "defaults": prune(0.1),
        "kinds": {"Linear": prune(0.2)},
        "patterns": {"a.*": prune(0.3)},
        "layers": {"a.fc2": prune(0.4)},
    })
    assert amounts(plan.resolve(LAYERS)) == {
        "a.fc1": 0.3, "a.fc2": 0.4, "c.fc": 0.2, "b.conv": 0.1,
        "b.bn": None,  # defaults skip kinds that cannot be pruned
        "emb": 0.1,
    }


def test_later_pattern_wins_and_regex_must_match_whole_name():
    plan = Plan.from_dict({"patterns": {"*fc*": prune(0.3), r"re:a\.fc\d": prune(0.6)}})
    assert amounts(plan.resolve(LAYERS))["a.fc1"] == 0.6
    assert amounts(plan.resolve(LAYERS))["c.fc"] == 0.3
    with pytest.raises(PlanError, match=r"patterns\['re:fc'\]"):
        Plan.from_dict({"patterns": {"re:fc": prune(0.9)}}).resolve(LAYERS)


def test_sections_replace_whole_blocks_null_switches_off_and_keep_clears_all():
    plan = Plan.from_dict({
        "defaults": {**prune(0.5), "quantization": {"bits": 8, "granularity": "per-tensor"}},
        "kinds": {"Linear": {"quantization": {"bits": 4, "symmetric": False}}},
        "layers": {"a.fc2": {"pruning": None}, "c.fc": "keep", "b.conv": {"keep": True}},
    })
    resolved = plan.resolve(LAYERS)
    # the kind's block replaces the default's entirely: granularity falls back to its own default
    assert resolved["a.fc1"].quantization == Quantization(bits=4, symmetric=False, granularity="per-channel")
    assert resolved["a.fc1"].pruning == Pruning("magnitude", 0.5)
    assert resolved["a.fc2"].pruning is None and resolved["a.fc2"].quantization.bits == 4
    assert resolved["c.fc"].keep and resolved["b.conv"].keep
    assert not resolved["a.fc1"].keep


def test_mapping_of_names_to_kinds_is_accepted():
    plan = Plan.from_dict({"kinds": {"Linear": prune(0.25)}})
    assert amounts(plan.resolve({"x": "Linear", "y": "Conv2d"})) == {"x": 0.25, "y": None}


FULL_PLAN = {
    "version": 1,
    "defaults": {"pruning": {"method": "magnitude", "amount": 0.5},
                 "quantization": {"bits": 8, "symmetric": True, "granularity": "per-channel", "range": "minmax"}},
    "kinds": {"Linear": {"quantization": {"bits": 4, "symmetric": False, "granularity": "group",
                                          "range": "mse", "group_size": 16}}},
    "patterns": {"a.*": {"pruning": {"method": "nm", "pattern": "2:4"}},
                 r"re:b\.conv": {"pruning": {"method": "structured", "amount": 0.25}}},
    "layers": {"c.fc": "keep",
               "a.fc2": {"low_rank": {"energy": 0.9}, "quantization": {"bits": "bf16"}},
               "a.fc1": {"low_rank": {"rank": 16}, "pruning": None}},
    "activation_quant": {"calibration": "percentile", "percentile": 99.9},
    "recovery": {"epochs": 2, "distill": {"temperature": 4.0}},
}


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip_yaml_and_json(tmp_path, suffix):
    plan = Plan.from_dict(FULL_PLAN)
    assert plan.to_dict() == FULL_PLAN
    path = tmp_path / f"plan{suffix}"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan
    assert again.resolve(LAYERS) == plan.resolve(LAYERS)
    assert again.recovery == {"epochs": 2, "distill": {"temperature": 4.0}}
    resolved = again.resolve(LAYERS)
    assert resolved["a.fc1"] == LayerPlan(
        pruning=None,
        quantization=Quantization(4, False, "group", 16, "mse"),
        low_rank=LowRank(rank=16),
    )
    assert resolved["b.conv"].pruning == Pruning("structured", 0.25)


def test_docstring_example_is_a_valid_plan_for_the_demo_model():
    from engine.zoo import DigitsCNN

    text = plan_module.__doc__.split("Example (YAML; JSON has the same structure)::")[1]
    plan = Plan.from_dict(yaml.safe_load(textwrap.dedent(text)))
    model = DigitsCNN()
    layers = [(n, type(m).__name__, tuple(m.weight.shape)) for n, m in model.named_modules()
              if getattr(m, "weight", None) is not None]
    resolved = plan.resolve(layers)
    assert resolved["features.0"].keep
    assert resolved["features.3"].pruning == Pruning("structured", 0.25)
    assert resolved["features.1"].pruning is None  # BatchNorm: the glob matched, pruning skipped
    assert resolved["classifier.1"].quantization == Quantization(bits="fp16")
    assert resolved["classifier.4"].pruning is None
    assert resolved["classifier.4"].quantization.group_size == 32


INVALID = [
    # (plan, text the one-line message must contain)
    ({"defaults": prune(1.5)}, "layer 'a.fc1'", "pruning.amount"),
    ({"layers": {"b.conv": prune(-0.1)}}, "layer 'b.conv'", "pruning.amount"),
    ({"layers": {"a.fc1": {"quantization": {"bits": 9}}}}, "layer 'a.fc1'", "quantization.bits"),
    ({"layers": {"a.fc1": {"quantization": {"bits": 1}}}}, "layer 'a.fc1'", "quantization.bits"),
    ({"layers": {"a.fc1": {"low_rank": {"rank": 0}}}}, "layer 'a.fc1'", "low_rank.rank"),
    ({"layers": {"a.fc1": {"low_rank": {"rank": 17}}}}, "layer 'a.fc1'", "low_rank.rank"),
    ({"layers": {"a.fc1": {"low_rank": {"energy": 1.2}}}}, "layer 'a.fc1'", "low_rank.energy"),
    ({"layers": {"a.fc1": {"quantization": {"granularity": "group", "group_size": 5}}}},
     "layer 'a.fc1'", "quantization.group_size"),
    ({"layers": {"b.conv": {"quantization": {"granularity": "group", "group_size": 8}}}},
     "layer 'b.conv'", "quantization.group_size"),  # 4*3*3 = 36 is not a multiple of 8
    ({"layers": {"a.fc1": {"pruning": {"method": "nm", "pattern": "5:4"}}}}, "layer 'a.fc1'", "pruning.pattern"),
    ({"layers": {"b.conv": {"pruning": {"method": "nm", "pattern": "1:8"}}}}, "layer 'b.conv'", "pruning.pattern"),
    ({"layers": {"emb": prune(0.5, "structured")}}, "layer 'emb'", "pruning.method"),
    ({"kinds": {"Embedding": {"low_rank": {"rank": 2}}}}, "layer 'emb'", "low_rank cannot apply"),
    ({"layers": {"b.bn": {"quantization": {"bits": 8}}}}, "layer 'b.bn'", "quantization cannot apply"),
    ({"layers": {"a.fc2": {"low_rank": {"rank": 6}, "pruning": {"method": "nm", "pattern": "2:4"}}}},
     "layer 'a.fc2'", "low_rank.rank"),
    ({"layers": {"a.fc2": {"low_rank": {"rank": 8},
                           "quantization": {"granularity": "group", "group_size": 16}}}},
     "layer 'a.fc2'", "low_rank.rank"),
    ({"layers": {"nope": prune(0.5)}}, "layer 'nope'", "no layer of this name"),
    ({"patterns": {"zzz*": prune(0.5)}}, "patterns['zzz*']", "matches no layer"),
    ({"kinds": {"Conv3d": prune(0.5)}}, "kinds['Conv3d']", "no layer of this kind"),
    ({"kinds": {"Linear": prune(0.5, "magnitude-global")}, "layers": {"c.fc": prune(0.3, "magnitude-global")}},
     "layer 'c.fc'", "pruning.amount"),
]


@pytest.mark.parametrize(("data", "layer", "field"), INVALID)
def test_invalid_plans_name_the_layer_and_field(data, layer, field):
    with pytest.raises(PlanError) as info:
        Plan.from_dict(data).resolve(LAYERS)
    message = str(info.value)
    assert layer in message and field in message
    assert "\n" not in message


@pytest.mark.parametrize(("data", "where"), [
    ({"defaults": {"pruning": {"method": "random", "amount": 0.1}}}, "defaults.pruning.method"),
    ({"defaults": {"pruning": {"method": "magnitude"}}}, "defaults.pruning.amount"),
    ({"defaults": {"quantization": {"bits": 4, "granularity": "row"}}}, "defaults.quantization.granularity"),
    ({"defaults": {"quantization": {"bits": 4, "granularity": "group"}}}, "defaults.quantization.group_size"),
    ({"defaults": {"quantization": {"bits": 4, "range": "l1"}}}, "defaults.quantization.range"),
    ({"defaults": {"low_rank": {"rank": 2, "energy": 0.5}}}, "defaults.low_rank"),
    ({"layers": {"x": {"prune": {}}}}, "layers['x']"),
    ({"patterns": {"re:(": prune(0.1)}}, "patterns['re:(']"),
    ({"activation_quant": {"calibration": "kl"}}, "activation_quant.calibration"),
    ({"version": 7}, "version"),
])
def test_malformed_plan_data_says_where(data, where):
    with pytest.raises(PlanError, match=re.escape(where)):
        Plan.from_dict(data)


def test_unknown_extension_is_rejected(tmp_path):
    with pytest.raises(PlanError, match="plan.txt"):
        Plan().save(tmp_path / "plan.txt")


def test_missing_or_binary_plan_file_is_a_one_line_plan_error(tmp_path) -> None:
    import pytest as _pytest

    from engine.errors import PlanError
    from engine.plan import Plan

    with _pytest.raises(PlanError, match="cannot read it"):
        Plan.load(tmp_path / "absent.yaml")
    binary = tmp_path / "plan.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with _pytest.raises(PlanError) as info:
        Plan.load(binary)
    assert len(str(info.value).splitlines()) == 1
