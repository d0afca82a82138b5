"""What compression produces: a runnable module plus the facts an exporter needs to store it small.

Methods never modify the original model. They work on a deep copy and record here what they did:
boolean masks for pruned weights (so fine-tuning can keep them), integer codes with scales for
quantized weights (so exporters can write real low-bit data), and ranks for factorized layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from engine.backends.base import Backend


@dataclass
class QuantizedWeight:
    """A weight stored as integer codes: ``w ≈ (codes - zero_point) * scale``.

    Scales and zero points broadcast against ``codes`` reshaped by `axis`/`group_size`:
    per-tensor (axis None, group_size None), per-channel along `axis`, or group-wise with
    `group_size` consecutive input elements sharing a scale in each output row.
    """

    codes: torch.Tensor  # integer dtype (int8/uint8 container for 2..8 bits)
    scale: torch.Tensor  # float32
    zero_point: torch.Tensor  # integer dtype, zeros for symmetric
    bits: int
    symmetric: bool
    axis: int | None = None
    group_size: int | None = None

    @property
    def overhead_bytes(self) -> int:
        """Bytes stored beside the codes: float32 scales and, when asymmetric, uint8 zero points
        (what engine.storage.scale_overhead counts from shapes alone)."""
        return self.scale.numel() * 4 + (0 if self.symmetric else self.zero_point.numel())

    def dequantize(self) -> torch.Tensor:
        """The float weight the codes stand for, in the original shape."""
        codes = self.codes.to(torch.float32)
        zero = self.zero_point.to(torch.float32)
        if self.group_size:
            out_ch = codes.shape[0]
            grouped = codes.reshape(out_ch, -1, self.group_size)
            deq = (grouped - zero.reshape(out_ch, -1, 1)) * self.scale.reshape(out_ch, -1, 1)
            return deq.reshape(codes.shape)
        if self.axis is not None:
            view = [1] * codes.dim()
            view[self.axis] = -1
            return (codes - zero.reshape(view)) * self.scale.reshape(view)
        return (codes - zero) * self.scale


@dataclass
class CompressedModel:
    """A compressed copy of a model; `module` runs in float, the rest says how to store it.

    For a model without a torch module (ONNX, weights only) `module` is None and `backend` holds
    the compressed copy (engine.backends: the float values, masks applied, codes dequantized);
    the dictionaries below are then keyed by the model's tensor keys (Layer.weight_key).
    """

    module: nn.Module | None
    #: parameter name (e.g. "features.0.weight") -> bool mask of kept weights.
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    #: parameter name -> integer codes and scales; the module holds the dequantized values.
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    #: parameter name -> torch dtype the weight is stored in (fp16 / bf16 casts).
    cast: dict[str, torch.dtype] = field(default_factory=dict)
    #: original layer name -> rank of the two-factor replacement.
    low_rank: dict[str, int] = field(default_factory=dict)
    #: original layer name -> (channels before, channels after) for structured pruning.
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: activation quantization settings the ONNX exporter applies (static int8), if any.
    activation_quant: dict[str, Any] | None = None
    #: the plan that produced this, as plain data.
    plan: dict[str, Any] = field(default_factory=dict)
    #: one line per thing a method chose not to do, and why (e.g. a rank too high to pay off).
    notes: list[str] = field(default_factory=list)
    #: The compressed copy as a backend, for models without a torch module (see above).
    backend: "Backend | None" = None
