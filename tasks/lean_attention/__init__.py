"""Lean Attention (Sanovar et al., 2024): stream-K decode attention against FlashAttention-2 and FlashDecoding."""
