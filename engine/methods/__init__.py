"""Compression techniques, one module each; importing this package fills the registry."""

from engine.methods import (  # noqa: F401
    awq, gptq, gradient, lowrank, magnitude, nm_sparsity, obs, quantize, structured)
from engine.methods.base import REGISTRY, STAGES, Context, Method, PruningMethod

__all__ = ["REGISTRY", "STAGES", "Context", "Method", "PruningMethod"]
