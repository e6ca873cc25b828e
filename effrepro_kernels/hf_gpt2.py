"""GPT-2 from transformers with our training kernels in it, and transformers' model code otherwise:

    from effrepro_kernels.hf_gpt2 import fuse_gpt2
    model = fuse_gpt2(GPT2LMHeadModel(config))   # the same parameters; model(input_ids, labels=...).loss

`fuse_gpt2` swaps modules of the model it is given: every LayerNorm becomes ours (same weights), every MLP's
bias + GELU becomes one kernel (same weights, same c_fc and c_proj modules), and it wraps the model so that a
forward given labels computes the loss with `linear_cross_entropy` from the last hidden states, never holding the
logits. A forward without labels is the model's own (logits as usual). The attention is the model's
`attn_implementation`, chosen when it is built (ours: `hf_attention.register`).
"""
from __future__ import annotations

import torch
from torch import nn

from .bias_gelu import bias_gelu
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

        hidden = self.model.transformer(input_ids, **kwargs).last_hidden_state
        # transformers' shift: position t predicts label t + 1
        loss = linear_cross_entropy(hidden[:, :-1].flatten(0, 1), self.model.lm_head.weight, labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss)


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
    return FusedLossLM(model)
