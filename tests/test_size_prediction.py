"""The plan editor's size forecast against what compress() really stores, on the demo model."""

from __future__ import annotations

from engine.compress import compress
from engine.demo import DEMO_MODEL
from engine.formats import load_model
from engine.plan import Plan
from engine.size_prediction import SizePredictor


def test_predicted_sizes_follow_the_engines_storage_rule():
    """The forecast equals compress()'s bytes where the plan fixes them (no pruning guesswork)."""
    model = load_model(DEMO_MODEL)
    predictor = SizePredictor(model)
    plans = [
        {"defaults": {"quantization": {"bits": 8}}},
        {"kinds": {"Linear": {"quantization": {"bits": 4, "granularity": "group", "group_size": 32,
                                               "symmetric": False}}}},
        {"defaults": {"pruning": {"method": "magnitude", "amount": 0.5}, "quantization": {"bits": 8}}},
        {"layers": {"classifier.1": {"low_rank": {"rank": 32}, "quantization": {"bits": "fp16"}}}},
        {"layers": {"classifier.1": {"low_rank": {"energy": 0.9}}}},
    ]
    for data in plans:
        plan = Plan.from_dict(data)
        predicted = predictor.predict(plan.resolve(model.layers))
        _compressed, report = compress(model, plan, measure=False)
        assert predicted.bytes_after == report.bytes_after, data
        for layer in report.layers:
            assert predicted.layers[layer.name].bytes_after == layer.bytes_after, (data, layer.name)
