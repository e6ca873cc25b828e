"""FlashAttention (Dao et al., 2022): the kernel benchmark and the end-to-end experiments."""
# Our FlashAttention's name in every task of this paper: a benchmark provider's, and the attn_implementation under
# which hf_attention registers it with transformers
from effrepro_kernels.hf_attention import NAME as OURS

__all__ = ["OURS"]
