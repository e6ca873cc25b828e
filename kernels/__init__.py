"""Attention kernels and their plain PyTorch references. Knows nothing of tasks or of the engine."""
from .block_sparse import butterfly_block_mask, random_block_mask
from .decode_attention import DecodeSchedule, decode_attention, make_schedule
from .flash_attn import BlockSparseLayout, dropout_keep_mask, flash_attn
from .reference import attention_reference, block_mask_to_dense, decode_attention_reference

__all__ = ["BlockSparseLayout", "DecodeSchedule", "attention_reference", "block_mask_to_dense", "butterfly_block_mask",
           "decode_attention", "decode_attention_reference", "dropout_keep_mask", "flash_attn", "make_schedule",
           "random_block_mask"]
