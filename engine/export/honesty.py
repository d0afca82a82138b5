"""What each format can store of a plan's savings, said before the export runs (issue 14 item 4).

A plan saves space in four ways: integer weight codes, unstructured zeros (masks), 16-bit
casts, and smaller layers (structured pruning, low-rank). Most formats store only some of
them: fp32 ONNX writes codes dequantized and zeros densely, so a pruned and quantized model is
exactly as large as the original there. Exporting to such a format is allowed (it is what some
runtimes read), but the user is told first, with the formats that do store the savings.
"""

from __future__ import annotations

from engine.compressed import CompressedModel
from engine.export.base import ONNX_SOURCE, TORCH_SOURCE, WEIGHTS_SOURCE, source_of

#: Per kind of model, the formats that store its savings (codes, zeros, casts), best first,
#: each with what it stores where that needs saying.
SMALL_FORMATS: dict[str, tuple[tuple[str, str], ...]] = {
    TORCH_SOURCE: (("slim", ".slim (codes and zeros packed)"), ("onnx-int8", "onnx-int8"),
                   ("onnx-w4", "onnx-w4")),
    ONNX_SOURCE: (("onnx-int8", "onnx-int8 (8-bit codes)"),
                  ("onnx-w4", "onnx-w4 (4-bit MatMul weights)"),
                  ("onnx-fp16", "onnx-fp16 (16-bit weights)")),
    WEIGHTS_SOURCE: (("safetensors-codes", "safetensors-codes"),),
}


#: Per format, which savings it stores for real: "codes" (any bits), "codes8" (codes, but
#: stored in 8 bits), "codes-matmul" (codes of MatMul/Linear weights only), "masks", "casts"
#: (16-bit floats), "half" (every weight in 16 bits, whatever the plan cast).
_STORES: dict[str, frozenset[str]] = {
    "onnx": frozenset(),
    "onnx-fp16": frozenset({"casts", "half"}),
    "onnx-int8": frozenset({"codes8"}),
    "onnx-dynamic": frozenset({"codes-matmul"}),
    "onnx-w4": frozenset({"codes-matmul"}),
    "onnx-w8": frozenset({"codes-matmul"}),
    "state-dict": frozenset({"casts"}),
    "safetensors": frozenset({"casts"}),
    "torch-module": frozenset(),
    "torchscript": frozenset(),
    "pt2": frozenset(),
    "slim": frozenset({"codes", "masks", "casts"}),
    "safetensors-codes": frozenset({"codes", "masks", "casts"}),
}


#: What stores each kind of saving a format can lose (see storage_gap).
_HELPS: dict[str, frozenset[str]] = {
    "low-bit codes": frozenset({"codes", "codes-matmul"}),
    "codes": frozenset({"codes", "codes8", "codes-matmul"}),
    "masks": frozenset({"masks"}),
    "casts": frozenset({"casts", "half"}),
}


def storage_gap(format_name: str, compressed: CompressedModel) -> str | None:
    """One line saying which of the plan's savings `format_name` writes at full size and which
    formats store them; None when the format stores all of them (or the plan saves nothing
    that depends on the format)."""
    stores = _STORES.get(format_name)
    if stores is None:
        return None
    lost: list[str] = []
    kinds: set[str] = set()
    bits = sorted({q.bits for q in compressed.quantized.values()})
    if not bits or "codes" in stores or "codes-matmul" in stores:
        pass  # the weight-only exporters say themselves which layers stay float
    elif "codes8" in stores:
        if bits[0] < 8:
            lost.append(f"{'/'.join(str(b) for b in bits if b < 8)}-bit codes (stored in 8 bits)")
            kinds.add("low-bit codes")
    elif "half" in stores:
        lost.append(f"{'/'.join(map(str, bits))}-bit weight codes (stored as 16-bit floats)")
        kinds.add("codes")
    else:
        lost.append(f"{'/'.join(map(str, bits))}-bit weight codes (written as float32)")
        kinds.add("codes")
    if compressed.masks and "masks" not in stores:
        lost.append("unstructured zeros (stored densely)")
        kinds.add("masks")
    if compressed.cast and not stores & {"casts", "half"}:
        lost.append("16-bit casts (stored in float32)")
        kinds.add("casts")
    if not lost:
        return None
    line = (f"{format_name} cannot store the plan's {', '.join(lost)}, so those savings do not "
            "make this file smaller")
    # only formats that store some of what this one loses
    better = [words for name, words in SMALL_FORMATS.get(source_of(compressed), ())
              if name != format_name
              and any(_STORES.get(name, frozenset()) & _HELPS[kind] for kind in kinds)]
    if not better:
        return line
    listed = better[0] if len(better) == 1 else f"{', '.join(better[:-1])} or {better[-1]}"
    return f"{line}; {listed} store{'s' if len(better) == 1 else ''} more of them"
