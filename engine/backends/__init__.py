"""Runtime backends behind the neutral model: one module per runtime (see base.py)."""

from engine.backends.base import (
    ALL_CAPABILITIES,
    FX_TRACE,
    GRADIENTS,
    GRAPH_SURGERY,
    LOW_RANK,
    ONNX_EXPORT,
    RUN,
    TORCH_MODULE,
    TRAIN,
    Backend,
    require,
)

__all__ = ["ALL_CAPABILITIES", "FX_TRACE", "GRADIENTS", "GRAPH_SURGERY", "LOW_RANK",
           "ONNX_EXPORT", "RUN", "TORCH_MODULE", "TRAIN", "Backend", "require"]
