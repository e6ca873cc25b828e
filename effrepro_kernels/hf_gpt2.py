"""GPT-2 from transformers with our training kernels in it, and transformers' model code otherwise:

    from effrepro_kernels.hf_gpt2 import fuse_gpt2
    model = fuse_gpt2(GPT2LMHeadModel(config))   # the same parameters; model(input_ids, labels=...).loss

`fuse_gpt2` swaps modules of the model it is given: every LayerNorm becomes ours (same weights), every MLP's
bias + GELU becomes one kernel (same weights, same c_fc and c_proj modules), and it wraps the model so that a
forward given labels computes the loss with `linear_cross_entropy` from the last hidden states, never holding the
logits. A forward without labels is the model's own (logits as usual). The attention is the model's
`attn_implementation`, chosen when it is built; where that is ours (`hf_attention.register`), every self-attention
in training runs `flash_attn_qkvpacked` on c_attn's output as it is (same weights), and outside training is the
model's own module, KV cache included (`pack_attention`, which also does this alone).
"""
from __future__ import annotations

import torch
from torch import nn

from .bias_gelu import bias_gelu
from .flash_attn import flash_attn_qkvpacked
from .hf_attention import NAME, key_padding_mask_of
from .layer_norm import LayerNorm
from .linear_cross_entropy import linear_cross_entropy

# the activations transformers gives the tanh approximation of GELU, which `bias_gelu` computes
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


class FusedMLP(nn.Module):
    """GPT-2's MLP (c_fc, GELU, c_proj, dropout) with c_fc's bias added inside the GELU kernel."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = mlp.c_fc, mlp.c_proj, mlp.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(bias_gelu(x @ self.c_fc.weight, self.c_fc.bias)))  # Conv1D: (in, out)


class PackedSelfAttention(nn.Module):
    """GPT-2's self-attention (c_attn, attention, c_proj, dropout) that, in training, attends over c_attn's output
    as it is, packed (`flash_attn_qkvpacked`): its backward writes c_attn's output gradient whole (transformers' module
    concatenates the three gradients). An empty KV cache given (transformers makes one unless use_cache=False) is
    filled as transformers' module fills it, a copy of the keys and values. Outside training, and given a cache that
    holds keys already, it is the module it replaced, cache and all."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.c_attn, self.c_proj, self.resid_dropout = attention.c_attn, attention.c_proj, attention.resid_dropout
        self.heads, self.head_dim, self.scaling = attention.num_heads, attention.head_dim, attention.scaling
        self.dropout = attention.attn_dropout.p
        self.replaced = (attention,)  # a tuple: its parameters are these, not a second copy in the state dict

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        from transformers import DynamicCache

        # the KV cache, by the name this transformers release gives it (GPT2Attention's past_key_values became cache)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = self.replaced[0].layer_idx
        # keys of earlier tokens in the cache must be attended to, and another kind of cache updated its own way
        cached = cache is not None and (type(cache) is not DynamicCache or cache.get_seq_length(layer) > 0)
        if (not self.training or cached or kwargs.get("encoder_hidden_states") is not None
                or kwargs.get("output_attentions")):
            self.replaced[0].train(self.training)
            return self.replaced[0](hidden_states, attention_mask=attention_mask, **kwargs)
        batch, seq, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states).view(batch, seq, 3, self.heads, self.head_dim)
        if cache is not None:  # left holding these keys and values, as transformers' module leaves it, to go on from
            cache.update(qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2), layer)
        padding = key_padding_mask_of(attention_mask, causal=True) if attention_mask is not None else None
        out = flash_attn_qkvpacked(qkv, causal=True, softmax_scale=self.scaling, dropout_p=self.dropout,
                                   key_padding_mask=padding)
        return self.resid_dropout(self.c_proj(out.reshape(batch, seq, -1))), None


class FusedLossLM(nn.Module):
    """A causal LM whose loss comes from the hidden states through `linear_cross_entropy` with its head's weight.
    Its parameters are the model's (as `model.`...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        if labels is None:
            return self.model(input_ids, **kwargs)
        from transformers.modeling_outputs import CausalLMOutput

        # the KV cache is left on (filled, unread): with use_cache=False transformers builds a mask (it looks for
        # packed sequences in the position ids), and reading that mask is a host read that breaks torch.compile's graph
        hidden = self.model.transformer(input_ids, **kwargs).last_hidden_state
        # transformers' shift: position t predicts label t + 1
        loss = linear_cross_entropy(hidden[:, :-1].flatten(0, 1), self.model.lm_head.weight, labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss)


def pack_attention(model: nn.Module) -> nn.Module:
    """`model` (a transformers GPT-2 whose attention is ours) with every self-attention a `PackedSelfAttention`,
    swapped in place; returned for chaining."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    if model.config._attn_implementation != NAME:
        raise ValueError(f"pack_attention runs our attention on packed q, k, v: build the model with "
                         f"attn_implementation={NAME!r} (hf_attention.register), not "
                         f"{model.config._attn_implementation!r}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GPT2Attention) and not child.is_cross_attention:
                setattr(parent, name, PackedSelfAttention(child))
    return model


def fuse_gpt2(model: nn.Module) -> FusedLossLM:
    """`model` (a transformers GPT2LMHeadModel), its modules swapped as the module docstring says, wrapped."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    config = model.config
    if config.model_type != "gpt2" or config.activation_function not in TANH_GELU:
        raise ValueError(f"fuse_gpt2 takes GPT-2 models with a tanh GELU {TANH_GELU}; this one is "
                         f"{config.model_type!r} with activation {config.activation_function!r}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                fused = LayerNorm(child.normalized_shape, eps=child.eps, device="meta")
                fused.weight, fused.bias = child.weight, child.bias
                setattr(parent, name, fused)
            elif isinstance(child, GPT2MLP):
                setattr(parent, name, FusedMLP(child))
    if config._attn_implementation == NAME:  # another attention asked for stays what it is
        pack_attention(model)
    return FusedLossLM(model)
