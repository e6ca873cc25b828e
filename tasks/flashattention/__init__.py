"""FlashAttention (Dao et al., 2022): the kernel benchmark and, later, the end-to-end experiments."""
