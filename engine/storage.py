"""The one rule for how many bytes a stored tensor takes, torch-free.

compress()'s report, the sensitivity curves, the allocator and the plan editor's live size
prediction all count with it, so a size predicted anywhere is the size the report will show.
It needs only counts, so a plan can be sized while it is edited, without building tensors.
"""

from __future__ import annotations

import math
from typing import Sequence

from engine.plan import Quantization

#: Bits per element of the float formats a plan can cast to.
FLOAT_FORMAT_BITS = {"fp16": 16, "bf16": 16}


def storage_bytes(numel: int, nonzero: int, bits: int, overhead: int = 0) -> int:
    """Bytes for `numel` elements of `bits` bits with `nonzero` non-zeros: dense codes, or a
    1-bit mask plus the non-zero codes when that is smaller, plus `overhead` (scales, zero
    points)."""
    dense = (numel * bits + 7) // 8
    sparse = (numel + 7) // 8 + (nonzero * bits + 7) // 8
    return min(dense, sparse) + overhead


def scale_overhead(quant: Quantization | None, shape: Sequence[int]) -> int:
    """Bytes of the float32 scales (and uint8 zero points when asymmetric) that integer codes
    of this shape carry: one per tensor, per output channel, or per group."""
    if quant is None or quant.is_float:
        return 0
    count = math.prod(shape)
    units = {"per-tensor": 1, "per-channel": shape[0]}.get(quant.granularity)
    if units is None:
        units = count // (quant.group_size or count)
    return units * 4 + (0 if quant.symmetric else units)
