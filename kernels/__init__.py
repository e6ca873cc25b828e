"""Attention kernels and their plain PyTorch references. Knows nothing of tasks or of the engine."""
from .block_sparse import butterfly_block_mask, random_block_mask
from .flash_attn import BlockSparseLayout, dropout_keep_mask, flash_attn
from .reference import attention_reference, block_mask_to_dense

__all__ = ["BlockSparseLayout", "attention_reference", "block_mask_to_dense", "butterfly_block_mask", "dropout_keep_mask", "flash_attn",
           "random_block_mask"]
