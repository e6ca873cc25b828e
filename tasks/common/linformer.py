"""Linformer attention (Wang et al. 2020, arXiv 2006.04768): keys and values are projected along the sequence,
from n rows to k, by learned matrices E and F (k × n), so attention costs O(n·k) instead of O(n²):

    softmax(Q (E K)ᵀ · scale) (F V)

One projection pair per layer, shared by its heads (the paper's headwise sharing); `share_kv` also uses E
for the values (F = E). The projections are sized for a fixed length n: a longer input is an error, a
shorter one is treated as padded to n, the padding masked out.

Two uses:
- `LinformerAttention`, a module computing attention from q, k, v (the LRA model's `linformer`);
- `apply_linformer(model, k, seq_len)`: a transformers encoder (BERT, RoBERTa) switched to Linformer, each
  attention module given its own projections, through transformers' AttentionInterface.

Written here because the PyPI packages (`linformer`, `linformer-pytorch`) are whole models with their own
attention layers, not a drop-in attention for transformers' models.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effrepro_kernels.hf_attention import key_padding_mask_of

# Not "...flash...": transformers takes any implementation name containing "flash" for a hub kernel.
NAME = "linformer"


class LinformerAttention(nn.Module):
    """Attention over keys and values projected to `k` rows; inputs (batch, heads, n, head_dim), n <= seq_len."""

    def __init__(self, seq_len: int, k: int, share_kv: bool = False):
        super().__init__()
        if not 1 <= k <= seq_len:
            raise ValueError(f"k={k} must be between 1 and seq_len={seq_len}")
        self.seq_len, self.k = seq_len, k
        # std 1/√n keeps a projected row (a sum of n keys) at the scale of one key, so the softmax has the
        # temperature of standard attention (the paper's analysis uses random Gaussian projections)
        self.e = nn.Parameter(torch.randn(k, seq_len) / math.sqrt(seq_len))
        self.f = None if share_kv else nn.Parameter(torch.randn(k, seq_len) / math.sqrt(seq_len))

    def flops_per_token(self, width: int, seq_len: int) -> int:
        """Training FLOPs (forward and backward) per token of one layer of `width` channels (heads × head_dim):
        E·K and F·V, and QKᵀ and PV over the k projected rows, each 2·k·width forward, thrice that with the
        backward. A column of E or F meets one token's key or value alone: counted as a weight (6 FLOPs a token
        each), the k × seq_len tables would count seq_len / width times their products. The length attended is
        k, whatever `seq_len`."""
        return 24 * width * self.k

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None = None, *,
                scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        """real: bool (batch, n), True for real keys (None: all real; callers pass None for unpadded batches, so
        that no layer reads the mask back from the device). Returns (batch, heads, n, head_dim)."""
        n = k.shape[-2]
        if n > self.seq_len:
            raise ValueError(f"the input has {n} tokens but Linformer was built for at most seq_len={self.seq_len}"
                             " (its projections have that many columns); build it for the longer length")
        # The first n columns: what an input padded to seq_len gives once its padding is masked out.
        e = self.e[:, :n]
        f = e if self.f is None else self.f[:, :n]
        slots = None
        if real is not None:
            keep = real[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep  # padded keys contribute nothing to the projections
            # A projected row that no real key reaches holds only padding: mask it as padding is masked (with
            # identity projections, k = n, this is exactly standard attention with a key padding mask).
            reached = (e != 0).to(torch.float32) @ real.to(torch.float32).T  # (k, batch)
            slots = (reached > 0).T[:, None, None, :]
        k = torch.matmul(e.to(k.dtype), k)
        v = torch.matmul(f.to(v.dtype), v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=slots, dropout_p=dropout_p, scale=scale)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs):
    """transformers' attention signature: (batch, heads, seq, head_dim) in, (batch, seq, heads, head_dim) out;
    the projections are the calling attention module's own (`module.linformer`)."""
    try:
        real = key_padding_mask_of(attention_mask, causal=False) if attention_mask is not None else None
    except ValueError:  # its message names effrepro's attention, which has the causal form Linformer lacks
        raise ValueError(f"{NAME} takes key-padding masks only (Linformer has no causal form), not this "
                         f"{attention_mask.dtype} {tuple(attention_mask.shape)} mask of another pattern") from None
    out = module.linformer(query, key, value, real, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `attn_implementation="linformer"` available to transformers models in this process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean (batch, 1, q, k) masks, as for sdpa
    return NAME


def apply_linformer(model: nn.Module, k: int, seq_len: int, share_kv: bool = False) -> list[str]:
    """Switch a transformers encoder (BERT, RoBERTa, ...) to Linformer attention for inputs of at most
    `seq_len` tokens: each self-attention module gets its own projections (`module.linformer`), new
    parameters to train. Returns the names of the modules changed."""
    config = model.config
    # The modules that call transformers' attention interface carry their layer index and causality.
    attentions = {name: m for name, m in model.named_modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")}
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no attention module calling transformers' attention "
                         "interface (one with `layer_idx` and `is_causal`)")
    causal = any(m.is_causal for m in attentions.values()) or getattr(config, "is_decoder", False)
    if causal or getattr(config, "add_cross_attention", False):
        raise ValueError(f"{type(model).__name__} is a decoder, but Linformer has no causal or cross-attention "
                         "form: apply it to an encoder (BERT, RoBERTa)")
    weight = next(model.parameters())
    for module in attentions.values():
        module.linformer = LinformerAttention(seq_len, k, share_kv).to(weight.device, weight.dtype)
    model.set_attn_implementation(register())
    if config._attn_implementation != NAME:
        raise ValueError(f"{type(model).__name__} does not let its attention implementation be changed")
    return list(attentions)
