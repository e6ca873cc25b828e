"""Attention kernels, the training fusions of GPT-2 (LayerNorm, bias + GELU, linear + cross-entropy), the KV-cache
kernels (quantization, pivotal counts), and their plain PyTorch references. Knows nothing of tasks or of the
engine."""
from .bias_gelu import bias_gelu
from .block_sparse import butterfly_block_mask, random_block_mask
from .decode_attention import (DecodeSchedule, decode_attention, decode_attention_quantized, make_schedule,
                               merge_attention)
from .flash_attn import BlockSparseLayout, dropout_keep_mask, flash_attn, flash_attn_qkvpacked
from .kv_quant import QuantizedKV, dequantize_kv, quantize_kv
from .layer_norm import LayerNorm, layer_norm
from .linear_cross_entropy import linear_cross_entropy
from .pivotal_counts import update_pivotal_counts
from .reference import (attention_reference, block_mask_to_dense, decode_attention_reference,
                        decode_scores_reference, dequantize_kv_reference, quantize_kv_reference)

__all__ = ["BlockSparseLayout", "DecodeSchedule", "LayerNorm", "QuantizedKV", "attention_reference", "bias_gelu",
           "block_mask_to_dense", "butterfly_block_mask", "decode_attention", "decode_attention_quantized",
           "decode_attention_reference", "decode_scores_reference", "dequantize_kv", "dequantize_kv_reference",
           "dropout_keep_mask", "flash_attn", "flash_attn_qkvpacked", "layer_norm", "linear_cross_entropy",
           "make_schedule", "merge_attention", "quantize_kv", "quantize_kv_reference", "random_block_mask",
           "update_pivotal_counts"]
