"""Attention kernels and their plain PyTorch references. Knows nothing of tasks or of the engine."""
from .reference import attention_reference

__all__ = ["attention_reference"]
