"""Models built from lightning-moe layers: a decoder-only transformer made from a planner Architecture."""

from lightning_moe.models.transformer import Attention, Block, DenseFFN, Transformer, build_model, num_params

__all__ = ["Attention", "Block", "DenseFFN", "Transformer", "build_model", "num_params"]
