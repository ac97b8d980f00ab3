"""transformer_jax: the Transformer of "Attention Is All You Need" in JAX and Flax."""

from transformer_jax.config import TransformerConfig, base_config
from transformer_jax.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer_jax.model import Transformer, init_cache

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "Transformer", "TransformerConfig", "base_config",
    "init_cache",
]
