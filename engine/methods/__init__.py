"""Compression techniques, one module each; importing this package fills the registry."""

from engine.methods import gradient, lowrank, magnitude, nm_sparsity, quantize, structured  # noqa: F401
from engine.methods.base import REGISTRY, STAGES, Context, Method, PruningMethod

__all__ = ["REGISTRY", "STAGES", "Context", "Method", "PruningMethod"]
