"""Bias correction: after pruning or quantization, keep each layer's mean output unchanged.

Changing ``W`` to ``Ŵ`` shifts a layer's mean output by ``(W - Ŵ) E[x]``; a systematic shift
is what rounding to a coarse grid or zeroing most weights produces, and the layers after it
amplify it (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019; AIMET's empirical bias correction). Adding

    δb = (W - Ŵ) E[x]

to the bias makes the mean output error exactly zero on the calibration data. ``E[x]`` is
the mean input row (for a convolution, the mean im2col column, so zero padding is counted
exactly as the convolution sees it), collected layer by layer in forward order on the
compressed model, so every correction accounts for those before it.

A layer without a bias whose output goes straight into a BatchNorm (the usual Conv → BN) is
corrected through that BatchNorm instead: lowering its running mean by δb is, in inference,
the same as adding δb to the layer's output. A layer with neither is left as it is, with a
note.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from engine.calibration_stats import InputStats, layer_by_layer, run_batch
from engine.compressed import CompressedModel
from engine.methods.base import Context, own_tensor, submodule, weight_of


def bias_shift(reference: torch.Tensor, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """``δb = (W - Ŵ) E[x]`` per output channel (float64), per conv group."""
    out = weight.shape[0]
    change = (reference.to(torch.float64) - weight.detach().to(torch.float64)).reshape(out, -1)
    per_group = out // stats.groups
    return torch.cat([change[g * per_group:(g + 1) * per_group] @ stats.mean[g]
                      for g in range(stats.groups)])


def following_batchnorms(module: nn.Module, names: list[str], batches: list[Any]
                         ) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """For each named layer, the BatchNorm its output tensor goes straight into (one forward
    pass of the first batch, matched by tensor identity), if any."""
    outputs: dict[int, str] = {}
    found: dict[str, nn.modules.batchnorm._BatchNorm] = {}
    handles = []
    for name in names:
        def after(_layer: nn.Module, _args: Any, output: Any, name: str = name) -> None:
            outputs[id(output)] = name
        handles.append(submodule(module, name).register_forward_hook(after))
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None:
            def before(layer: nn.Module, args: tuple[Any, ...]) -> None:
                name = outputs.get(id(args[0])) if args else None
                if name is not None:
                    found.setdefault(name, layer)  # type: ignore[arg-type]
            handles.append(norm.register_forward_pre_hook(before))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            run_batch(module, batches[0])
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    return found


def correct_biases(module: nn.Module, references: Mapping[str, torch.Tensor],
                   result: CompressedModel, context: Context) -> None:
    """Shift the bias (or the following BatchNorm's running mean) of every layer in
    `references` (name -> its weight before pruning and quantization) as the module docstring
    says; `module` holds the compressed weights."""
    if not references:
        return
    names = list(references)
    batches = list(context.calibration or [])
    no_bias = [name for name in names if own_tensor(submodule(module, name), "bias") is None]
    norms = following_batchnorms(module, no_bias, batches) if no_bias and batches else {}
    for name in no_bias:
        if name not in norms:
            result.notes.append(f"{name}: no bias and no BatchNorm right after it; "
                                "bias correction skipped")
    wanted = [name for name in names if name not in no_bias or name in norms]
    for i, (name, stats) in enumerate(layer_by_layer(module, wanted, context, "bias correction",
                                                     second_moments=False)):
        shift = bias_shift(references[name], weight_of(module, name), stats)
        with torch.no_grad():
            bias = own_tensor(submodule(module, name), "bias")
            if bias is not None:
                bias.add_(shift.to(bias.dtype))
            else:
                running_mean = norms[name].running_mean
                assert running_mean is not None
                running_mean.sub_(shift.to(running_mean.dtype))
        context.progress((i + 1) / len(wanted), f"bias correction: {name}")
